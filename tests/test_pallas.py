"""The fused Pallas kernels: the shared suite, in the interpreter on CPU and natively on GPU.

On CPU the kernels run with CHUNKATTN_PALLAS_INTERPRET=1 (the Pallas interpreter) at small
sizes and small blocks, so tails, multiple blocks and every phase of the loops are exercised.
Requests the kernels do not implement (a mask_fn/score_fn closing over arrays) raise
NotImplementedError naming the feature; the suite skips those cases with that reason.

On any host the kernels are also lowered for CUDA (jax.export with platforms=["cuda"]): that runs
the Pallas → Triton lowering of every kernel body for every feature, head dim and dtype, and
checks that the dispatcher serves each feature with the kernels; only PTX compilation is left
to the GPU.
"""

from __future__ import annotations

import dataclasses
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_suite import AttentionSuite

import chunkattn
from chunkattn import chunked, masks, testing
from chunkattn.arguments import resolve_precision
from chunkattn.pallas import PallasConfig, block
from chunkattn.pallas.config import f32_dot_precision, heuristic
from chunkattn.pallas.kernel_common import META, segment_ranges
from chunkattn.parallel import ring_attention

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")


@pytest.mark.skipif(ON_GPU, reason="the interpreter suite is for CPU; TestPallasGPU runs on GPU")
class TestPallasInterpret(AttentionSuite):
    implementation = "pallas"
    config = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
    may_decline = True
    mask_shapes = ((19, 41),)
    # Interpreting is slow: the lengths, masks, fully-masked rows and dtypes cover the kernels;
    # these add nothing kernel-specific at interpreter speed.
    test_long_unequal = test_vmap = test_no_retrace = test_large_logits_f16 = None
    # Sinks only change the rows' starting max and sum: one kind per masking mechanism.
    sink_kinds = ("causal_offset", "window_pair", "kv_lengths", "segment_pair", "mask_full")
    sink_kinds += ("mask_fn", "bias_full", "everything")

    def test_debug_infs_and_nans_are_clean_on_valid_input(self):
        pytest.skip(
            "the interpreter runs each kernel body as its own program, so the flags see the "
            "kernels' internal −inf; on a GPU a kernel is one custom call (TestPallasGPU)"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
class TestPallasGPU(AttentionSuite):
    implementation = "pallas"
    config = None  # the heuristic block sizes, as users get them
    may_decline = True


def test_config_is_validated():
    for kwargs, field in [
        ({"block_q": 24}, "block_q"),
        ({"block_k_bwd": 8}, "block_k_bwd"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"backward": "fused"}, "backward"),
    ]:
        with pytest.raises(ValueError, match=f"PallasConfig.{field}"):
            PallasConfig(**kwargs)


def test_declines_what_it_does_not_implement():
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=16, seq_k=16, head_dim=16)
    table = jnp.linspace(0.0, 1.0, 16)
    declined = [
        ("mask_fn that closes over arrays", dict(mask_fn=lambda b, h, i, j: table[j] > 0.5)),
        ("score_fn operations round", dict(score_fn=lambda s, b, h, i, j: jax.lax.round(s))),
        ("PallasConfig", dict(config=chunkattn.ChunkConfig(8, 8))),
    ]
    for feature, kwargs in declined:
        with pytest.raises(NotImplementedError, match=feature):
            chunkattn.dot_product_attention(q, k, v, implementation="pallas", **kwargs)


def _while_loops(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(" while(")


def test_bias_gradient_runs_only_when_the_bias_is_differentiated():
    """The bias gradient comes from the chunked backward, which XLA drops when unused."""
    cfg = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)

    def loss(q, k, v, bias):
        out = chunkattn.dot_product_attention(q, k, v, bias, implementation="pallas", config=cfg)
        return jnp.sum(out)

    # Compiled only, long enough that the chunked backward (512-token chunks) keeps its loops.
    qkv = [jax.ShapeDtypeStruct((1, 1024, 2, 16), jnp.float32)] * 3
    bias = jax.ShapeDtypeStruct((1, 2, 1024, 1024), jnp.float32)
    with_bias = _while_loops(jax.grad(loss, argnums=(0, 3)), *qkv, bias)
    without = _while_loops(jax.grad(loss, argnums=0), *qkv, bias)
    assert without < with_bias, (without, with_bias)

    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=32, seq_k=32, head_dim=16)
    bias = jax.random.normal(jax.random.PRNGKey(1), (1, q.shape[2], 32, 32))
    got = jax.grad(loss, argnums=3)(q, k, v, bias)
    want = jax.grad(lambda b: jnp.sum(chunkattn.reference_attention(q, k, v, b)))(bias)
    assert testing.relative_error(got, want) <= testing.tolerance(q.dtype, grad=True)


def test_dropout_with_bias_and_score_fn():
    """Dropout inside the kernels and in the bias gradient's chunked backward draw one mask."""
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=33, seq_k=40, head_dim=16)
    bias = jax.random.normal(jax.random.PRNGKey(1), (1, q.shape[2], 1, 40))
    testing.assert_matches_reference(
        lambda *a, **kw: chunkattn.dot_product_attention(
            *a, implementation="pallas", config=TestPallasInterpret.config, **kw
        ),
        q,
        k,
        v,
        bias,
        dropout_rate=0.3,
        dropout_rng=jax.random.PRNGKey(3),
        broadcast_dropout=False,
        is_causal=True,
        score_fn=lambda s, b, h, i, j: s - 0.1 * jnp.abs(i - j),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(is_causal=True, q_offset=8),
        dict(local_window_size=(5, 3), query_seq_lengths=jnp.array([37, 20])),
        dict(
            segment_ids=(
                jnp.arange(37)[None].repeat(2, 0) // 10,
                jnp.arange(45)[None].repeat(2, 0) // 12,
            ),
            mask_fn=lambda b, h, i, j: (i + j) % 5 != 0,
        ),
        dict(
            dropout_rate=0.2,
            dropout_rng=jax.random.PRNGKey(2),
            score_fn=lambda s, b, h, i, j: 2 * s,
        ),
    ],
    ids=["causal_offset", "window_lengths", "segments_mask_fn", "dropout_score_fn"],
)
def test_atomic_backward(kwargs):
    """PallasConfig(backward="atomic"): dQ added with atomics inside the dK/dV kernel."""
    cfg = dataclasses.replace(TestPallasInterpret.config, backward="atomic")
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0), seq_q=37, seq_k=45, num_kv_heads=2, head_dim=16
    )
    testing.assert_matches_reference(
        lambda *a, **kw: chunkattn.dot_product_attention(
            *a, implementation="pallas", config=cfg, **kw
        ),
        q,
        k,
        v,
        **kwargs,
    )


def test_atomic_backward_at_head_dims_that_are_not_a_power_of_two():
    """The atomic dQ accumulator is as wide as the block (H=24 in 32 columns, Hv=20): the
    padding columns take no part in the gradients, and sinks join the row sums."""
    cfg = dataclasses.replace(TestPallasInterpret.config, backward="atomic")
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(1), seq_q=21, seq_k=30, num_kv_heads=2, head_dim=24, head_dim_v=20
    )
    testing.assert_matches_reference(
        lambda *a, **kw: chunkattn.dot_product_attention(
            *a, implementation="pallas", config=cfg, **kw
        ),
        q,
        k,
        v,
        is_causal=True,
        q_offset=9,
        sinks=jnp.array([0.5, -1.0, 0.0, 2.0]),
    )


# The GPU that Pallas's Triton lowering compiles for. jax 0.11 and 0.12 read its compute
# capability from the default device or from the abstract mesh's device, and fail without one
# ("No supported GPU devices found"); jax 0.10 falls back to sm_90 by itself and ignores this.
# No CUDA plugin is needed.
_ABSTRACT_H100 = jax.sharding.AbstractMesh(
    (1,),
    ("gpu",),
    abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    ),
)


def _triton_kernels_for_cuda(fn, *args, mesh=_ABSTRACT_H100) -> int:
    """Lower `fn` for CUDA on any host (the Pallas → Triton lowering runs here) and count the
    Triton kernel calls in the program. PTX compilation is left out (bench/compile_report.py
    does it on the CPU with the cuda-aot extra). `mesh`: an abstract H100 mesh whose axes a
    shard_map inside `fn` uses."""
    check = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),  # the dispatcher's view
        jax.sharding.use_abstract_mesh(mesh),  # the lowering's view
    ):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[check])(
            *args
        )
    return exported.mlir_module().count("@__gpu$xla.gpu.triton")


_T = 300  # not a multiple of any block size: tail blocks everywhere
_CUDA_FEATURES = {
    "causal": dict(is_causal=True),
    "window_offset": dict(local_window_size=(17, 3), q_offset=5),
    "lengths": dict(
        query_seq_lengths=jnp.array([200, 3]), key_value_seq_lengths=jnp.array([7, 300])
    ),
    "segments": dict(segment_ids=jnp.arange(_T)[None].repeat(2, 0) // 37),
    "soft_cap": dict(logits_soft_cap=30.0, is_causal=True),
    "mask_fn": dict(mask_fn=lambda b, h, i, j: (i + j) % 3 != 0, is_causal=True),
    "score_fn": dict(score_fn=lambda s, b, h, i, j: s - 0.1 * jnp.abs(i - j).astype(s.dtype)),
    "dropout": dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(1)),
    "dense_mask": dict(mask=jnp.ones((2, 1, _T, _T), bool)),
    "bias": dict(bias=jnp.zeros((1, 4, 1, _T))),
    "bias_2d": dict(bias=jnp.zeros((2, 4, _T, _T)), logits_soft_cap=20.0),
    "sinks": dict(sinks=jnp.zeros(4), is_causal=True),
    "sinks_score_fn": dict(sinks=jnp.ones(4), score_fn=lambda s, b, h, i, j: s * 0.5),
    "atomic": dict(is_causal=True, config=PallasConfig(backward="atomic")),
}


@pytest.mark.parametrize("backward", ["split", "atomic"])
@pytest.mark.parametrize("feature", list(_CUDA_FEATURES))
def test_every_feature_lowers_to_triton_for_cuda(feature, backward, monkeypatch):
    """implementation=None on a GPU serves each feature with the kernels (no fallback), and
    the Triton lowering accepts every kernel body, forward and both backward kernels (with
    backward="atomic": the dK/dV kernel that also adds dQ)."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    kwargs = dict(_CUDA_FEATURES[feature])
    if backward == "atomic":
        kwargs["config"] = PallasConfig(backward="atomic")
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0),
        seq_q=_T,
        seq_k=_T,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        dtype=jnp.bfloat16,
    )
    bias = kwargs.pop("bias", None)

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(q, k, v, bias, **kwargs)
        return jnp.sum(out.astype(jnp.float32))

    atomic = backward == "atomic" or feature == "atomic"
    kernels = 2 if atomic else 3  # forward, dQ, dK/dV (atomic: dQ inside dK/dV)
    assert _triton_kernels_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == kernels


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "head_dim,head_dim_v", [(32, 32), (64, 64), (72, 72), (128, 128), (192, 128), (256, 256)]
)
def test_head_dims_and_dtypes_lower_for_cuda(head_dim, head_dim_v, dtype, monkeypatch):
    """Head dims 32–256, MLA's 192/128 among them; a dim that is not a power of two is
    masked inside the kernels, so the arrays handed to them keep the user's head dims."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0),
        seq_q=_T,
        seq_k=_T,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        dtype=dtype,
    )

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
        return jnp.sum(out.astype(jnp.float32))

    assert _triton_kernels_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == 3


def test_declined_functions_fall_back_to_chunked_on_gpu(monkeypatch):
    """A mask_fn the kernels cannot take leaves the dispatcher on the chunked path: no kernels."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=64, seq_k=64, head_dim=64)
    table = jnp.linspace(0.0, 1.0, 64)

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(q, k, v, mask_fn=lambda b, h, i, j: table[j] > 0.5)
        return jnp.sum(out)

    assert _triton_kernels_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == 0


def test_dense_tiles_halve_the_default_key_block():
    """A bias/mask varying along T and S streams a tile per step: the default key block halves
    (shared memory, bench/NOTES.md v5); index-only masks and a user's block_k are untouched."""
    plain = heuristic(128, jnp.bfloat16, 4096, 4096, PallasConfig())
    tiles = heuristic(128, jnp.bfloat16, 4096, 4096, PallasConfig(), dense_tiles=True)
    assert (plain["block_k"], tiles["block_k"]) == (128, 64)
    assert tiles["block_q"] == plain["block_q"] and tiles["block_k_bwd"] == plain["block_k_bwd"]
    mine = heuristic(128, jnp.bfloat16, 4096, 4096, PallasConfig(block_k=128), True)
    assert mine["block_k"] == 128


_P = jax.lax.Precision
# What each precision of a float32 call runs as (README): the API's None is HIGHEST (exact), as
# in the chunked path; DEFAULT and HIGH TF32 tensor cores, as XLA's GPU dots; an algorithm
# preset its own (TF32_TF32_F32_X3: three TF32 products).
_F32_DOTS = {
    None: "ieee",
    _P.DEFAULT: "tf32",
    _P.HIGH: "tf32",
    _P.HIGHEST: "ieee",
    jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3: "tf32x3",
}


@pytest.mark.parametrize("precision", list(_F32_DOTS), ids=str)
def test_float32_precision_reaches_the_triton_dots(precision, monkeypatch):
    """float32 at each `precision`: every tt.dot of the forward, dQ and dK/dV kernels, in the
    Triton IR that Pallas lowers for CUDA, has the input precision `f32_dot_precision` claims
    (ieee: no attribute), and the heuristic picks that precision's blocks."""
    from jax._src.pallas.triton import lowering

    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    resolved = resolve_precision(precision, jnp.float32)
    assert f32_dot_precision(resolved) == _F32_DOTS[precision]
    modules = []
    real = lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        modules.append(str(result.module))
        return result

    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0), seq_q=64, seq_k=64, head_dim=32, dtype=jnp.float32
    )

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="pallas", precision=precision
        )
        return jnp.sum(out)

    with mock.patch.object(lowering, "lower_jaxpr_to_triton_module", recording):
        assert _triton_kernels_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == 3
    assert len(modules) == 3
    for text in modules:
        dots = [line for line in text.splitlines() if "tt.dot " in line]
        found = {m[1] if (m := re.search(r"inputPrecision = (\w+)", d)) else "ieee" for d in dots}
        assert dots and found == {_F32_DOTS[precision]}, (precision, found)
    tensor_cores = heuristic(128, jnp.float32, 4096, 4096, PallasConfig(), precision=_P.DEFAULT)
    mine = heuristic(128, jnp.float32, 4096, 4096, PallasConfig(), precision=resolved)
    assert (mine == tensor_cores) == (_F32_DOTS[precision] != "ieee")


def _pallas_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every pallas_call's operands in a jaxpr (sub-jaxprs included)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if str(eqn.primitive) == "pallas_call":
            shapes += [tuple(v.aval.shape) for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _pallas_operand_shapes(inner)
    return shapes


def test_head_dims_are_not_padded_in_memory():
    """MLA's 192/128 head dims reach the kernels as they are: the padding to 256/128-wide
    blocks is masked loads and stores inside the kernels, not padded copies of q, k, v."""
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0), seq_q=32, seq_k=32, head_dim=192, head_dim_v=128
    )

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="pallas", config=TestPallasInterpret.config
        )
        return jnp.sum(out)

    shapes = _pallas_operand_shapes(
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    )
    head_dims = {s[-1] for s in shapes if len(s) == 4}
    assert head_dims == {192, 128}, head_dims
    testing.assert_matches_reference(
        lambda *a, **kw: chunkattn.dot_product_attention(
            *a, implementation="pallas", config=TestPallasInterpret.config, **kw
        ),
        q,
        k,
        v,
        is_causal=True,
        sinks=jnp.array([0.0, 1.0, -1.0, 2.0]),
    )


def test_segment_ranges_skip_blocks_of_other_documents():
    """Per block, the loops visit only the blocks whose segment ids can meet its own: packed
    documents cost ≈ Σ Tᵢ², and unsorted ids are still exact (first to last meeting block)."""
    docs = jnp.repeat(jnp.arange(8, dtype=jnp.int32), 16)[None]  # 8 documents of 16 tokens
    full = jnp.array([128])
    r = segment_ranges(docs, docs, full, full, 16, 16, "q")
    np.testing.assert_array_equal(r[0], np.stack([np.arange(8), np.arange(8) + 1], -1))
    r = segment_ranges(docs, docs, full, full, 32, 16, "k")  # key block j: query block j // 2
    np.testing.assert_array_equal(r[0, :, 0], np.arange(8) // 2)
    # Padding past the length takes no part; an unsorted id meets the first and last blocks.
    odd = jnp.array([[5, 5, 1, 1, 2, 2, 5, 5]], jnp.int32)
    r = segment_ranges(odd, odd, jnp.array([8]), jnp.array([6]), 2, 2, "q")
    np.testing.assert_array_equal(r[0], [[0, 1], [1, 2], [2, 3], [0, 1]])
    none = segment_ranges(odd, odd + 10, jnp.array([8]), jnp.array([8]), 2, 2, "q")
    assert np.all(none[..., 0] == none[..., 1]), "no shared id: empty ranges"


def test_packed_documents_match_the_reference():
    """Many short documents over several blocks (the loops start and stop mid-sequence)."""
    lengths = [1, 9, 30, 2, 17, 0, 22, 5]
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(2, 0))
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(4), seq_q=seg.shape[1], num_heads=4, num_kv_heads=2, head_dim=16
    )
    testing.assert_matches_reference(
        lambda *a, **kw: chunkattn.dot_product_attention(
            *a, implementation="pallas", config=TestPallasInterpret.config, **kw
        ),
        q,
        k,
        v,
        segment_ids=seg,
        is_causal=True,
        sinks=jnp.array([0.0, 1.0, -1.0, 0.5]),
    )


# ------------------------------------------------------------- the block contract (block.py)


def _block_request(**kwargs) -> chunked.Static:
    request = dict(spec=masks.MaskSpec(), scale=0.25, soft_cap=None, score_fn=None)
    request |= dict(dropout_rate=0.0, broadcast_dropout=True, tq=8, tk=8, seq_k=40)
    return chunked.Static(**(request | dict(precision=jax.lax.Precision.HIGHEST) | kwargs))


def test_block_meta_folds_global_positions():
    """A block at global row q_base and key k_base: the kernels' causal/window bounds are the
    global ones shifted by k_base − q_base (an offset near int32's limit saturates instead of
    wrapping), and the lengths count from the bases, clipped to the block."""
    q = k = v = jax.ShapeDtypeStruct((2, 24, 2, 16), jnp.float32)
    spec = masks.MaskSpec(is_causal=True, window=(30, 2))
    st = block.block_static(_block_request(spec=spec), q, k, v)
    marr = masks.MaskArrays(
        jnp.array([3, 2**31 - 100], jnp.int32),
        q_lengths=jnp.array([70, -(2**31)], jnp.int32),
        kv_lengths=jnp.array([30, 2**31 - 1], jnp.int32),
        q_base=jnp.int32(48),
        k_base=jnp.int32(16),
    )
    meta = dict(zip(META, np.asarray(block.block_meta(st, marr, 24, 40)).T, strict=True))
    np.testing.assert_array_equal(meta["q_offset"], [3 + 32, 2**30 + 32])
    np.testing.assert_array_equal(meta["q_len"], [22, 0])
    np.testing.assert_array_equal(meta["kv_len"], [14, 40])
    np.testing.assert_array_equal(meta["rel_lo"], [3 - 30 + 32, 2**30 + 32])
    np.testing.assert_array_equal(meta["rel_hi"], [3 + 32, 2**30 + 32])
    for feature, kwargs in [
        ("mask_fn", dict(spec=masks.MaskSpec(mask_fn=lambda b, h, i, j: i >= j))),
        ("score_fn", dict(score_fn=lambda s, b, h, i, j: s)),
        ("dropout", dict(dropout_rate=0.1)),
    ]:
        with pytest.raises(NotImplementedError, match=feature):
            block.block_static(_block_request(**kwargs), q, k, v)


def test_block_forward_equals_the_chunked_contract_at_global_positions():
    """The kernels on one block at global positions (causal + window + q_offset, lengths,
    segment ids, soft cap, GQA; several 16-blocks and a tail) give the chunked contract's out
    and lse, rows that see no key included. The backward from a merged lse is checked through
    the ring (tests/parallel_check.py, case pallas_ring: multi-block pieces, sinks, lengths)."""
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0), seq_q=40, seq_k=56, num_heads=4, num_kv_heads=2, head_dim=16
    )
    ids = lambda *runs: jnp.asarray(np.concatenate([np.full(n, i) for i, n in enumerate(runs)]))
    marr = masks.MaskArrays(
        jnp.array([3, -5], jnp.int32),
        q_lengths=jnp.array([100, 70]),
        kv_lengths=jnp.array([90, 60]),
        q_segment_ids=jnp.stack([ids(10, 30), ids(40)]),
        kv_segment_ids=jnp.stack([ids(20, 36), ids(30, 26)]),
        q_base=jnp.int32(56),
        k_base=jnp.int32(24),
    )
    spec = masks.MaskSpec(is_causal=True, window=(40, 2))
    request = _block_request(spec=spec, soft_cap=2.0, seq_k=56)
    cfg = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
    st = block.block_static(request, q, k, v, segment_dtype=jnp.int32, config=cfg)

    def both(q, k, v, marr):
        got = block.block_forward(st, q, k, v, marr)
        return got, chunked.block_forward(request, q, k, v, None, (), marr, None)

    (out, lse), (want_out, want_lse) = jax.jit(both)(q, k, v, marr)
    assert np.isneginf(want_lse).any() and np.isfinite(want_lse).any()  # both kinds of row
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    tol = testing.tolerance(q.dtype)
    assert testing.relative_error(out, want_out) <= tol
    assert testing.relative_error(finite(lse), finite(want_lse)) <= tol


def test_ring_attention_steps_lower_to_triton_for_cuda(monkeypatch):
    """On a GPU, ring_attention(implementation=None) runs the kernels in its ring steps: a
    window with q_offset, GQA, segment ids, lengths, soft cap and sinks lowers to the forward,
    dQ and dK/dV Triton kernels (one piece pair per step here: a causal ring's zig-zag runs
    2 × 2 pairs, the interpreter case of tests/parallel_check.py), and nothing falls back."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    mesh = jax.sharding.AbstractMesh((1,), ("sp",), abstract_device=_ABSTRACT_H100.abstract_device)
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(0), seq_q=256, num_heads=4, num_kv_heads=2, head_dim=64
    )
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    kwargs = dict(local_window_size=(100, 0), q_offset=3, logits_soft_cap=30.0)
    kwargs |= dict(segment_ids=jnp.arange(256)[None].repeat(2, 0) // 37)
    kwargs |= dict(query_seq_lengths=jnp.array([200, 100]), sinks=jnp.zeros(4))

    def loss(q, k, v):
        out = ring_attention(q, k, v, mesh=mesh, axis_name="sp", **kwargs)
        return jnp.sum(out.astype(jnp.float32))

    kernels = _triton_kernels_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, mesh=mesh)
    assert kernels == 3, kernels
