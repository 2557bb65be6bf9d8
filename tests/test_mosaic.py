"""The Mosaic GPU (Hopper) forward kernel, `implementation="pallas_mosaic"` (issue 21).

Three levels, each against the float32 reference:
- Default run (any jax, CPU, seconds): the kernel's parts — the per-row key ranges and the block
  schedule against the dense mask, the soft cap, the online softmax's edge cases — and
  `mosaic.emulate`, the kernel's loops in plain jnp, through the public API (padding, the
  custom_vjp, and for one case the Triton backward kernels in the Pallas interpreter).
- The Mosaic GPU interpreter (jax >= 0.11; jax 0.10's cannot run a transposed wgmma operand):
  the kernel itself, TMA ring, barriers and warpgroups included, on the same cases. Run with the
  cuda-aot venv of jax 0.11.2, e.g.
  `/tmp/chunkattn-cuda-aot-jax0.11.2/bin/python -m pytest tests/test_mosaic.py`.
  It takes P through shared memory and adds the P·V product afterwards (mosaic_compat.py): the
  compiled kernel's register-operand wgmma with an in-place accumulator is not interpreted.
- GPU (marker `gpu`, skipped without one): every feature at bf16 H=128, every head dim (64, 128,
  256, 128/64) with the richest feature sets and at f16; forward, lse and gradients (the Triton
  backward), compiled natively (bench/gpu_session.sh mosaic).
"""

from __future__ import annotations

import functools
import itertools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkattn
from chunkattn import api, masks, testing
from chunkattn.pallas import PallasConfig, mosaic, mosaic_backward

ON_GPU = jax.default_backend() == "gpu"
B, T, S, N, K = 2, 200, 200, 4, 2
CFG = mosaic.MosaicConfig(
    block_k=64, backward=PallasConfig(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)
)


def _has_interpreter() -> bool:
    try:
        from chunkattn.pallas import mosaic_compat

        mosaic_compat.interpret_params()
        return True
    except (ImportError, NotImplementedError):
        return False


def in_the_interpreter(test):
    """Runs `test` on a CPU whose jax has a Mosaic GPU interpreter that runs the kernels."""
    test = pytest.mark.skipif(ON_GPU, reason="the interpreter checks are for CPU")(test)
    return pytest.mark.skipif(
        not _has_interpreter(),
        reason=f"jax {jax.__version__}'s Mosaic GPU interpreter cannot run a transposed wgmma "
        "operand; run with jax >= 0.11 (the cuda-aot venv of 0.11.2)",
    )(test)


def _stripes(b, h, i, j):
    """A mask_fn of every index: drops every third key for odd heads (another third in batch
    1), keeps the diagonal (global positions: q_offset shifts it)."""
    return (j % 3 != 1 + b) | (h % 2 == 0) | (i == j)


def _alibi(s, b, h, i, j):
    """ALiBi with a slope per (batch, head), written with exp2 (Mosaic GPU lowers no pow)."""
    slope = jnp.exp2(-(h + 2 * b + 1).astype(jnp.float32))
    return s - slope * jnp.abs(i - j).astype(jnp.float32)


def _alibi_huge_rows(s, b, h, i, j):
    """`_alibi`, and every 5th query position scores −3e38 on every key: finite, so the softmax
    averages its keys uniformly, as on every path (the kernel keeps a score_fn's scores in the
    natural domain: scaled by log₂e they would overflow to −inf and read as masked, output 0)."""
    return jnp.where(i % 5 == 0, -3e38, _alibi(s, b, h, i, j))


def _segments(rng, batch, length, sort):
    ids = rng.integers(0, 3, (batch, length))
    return jnp.asarray(np.sort(ids, axis=1) if sort else ids, jnp.int32)


def cases(batch=B, seq_q=T, seq_k=S, heads=N):
    """Feature combinations as keyword arguments of dot_product_attention."""
    rng = np.random.default_rng(seq_q * 7 + seq_k)
    sinks = jnp.asarray(rng.normal(size=heads), jnp.float32)
    return {
        "causal_gqa_sinks": dict(is_causal=True, sinks=sinks),
        "window_offset_softcap_lengths": dict(
            local_window_size=(50, 10),
            q_offset=jnp.array([3, 70][:batch]),
            logits_soft_cap=5.0,
            query_seq_lengths=jnp.array([seq_q, seq_q * 3 // 4][:batch]),
            key_value_seq_lengths=jnp.array([seq_k * 9 // 10, seq_k][:batch]),
        ),
        "segments_unsorted_lengths": dict(
            segment_ids=(
                _segments(rng, batch, seq_q, sort=False),
                _segments(rng, batch, seq_k, sort=False),
            ),
            key_value_seq_lengths=jnp.array([seq_k, seq_k // 2][:batch]),
        ),
        "segments_sorted_causal": dict(
            is_causal=True, segment_ids=_segments(rng, batch, seq_q, sort=True)
        ),
        "empty_rows_sinks": dict(is_causal=True, q_offset=-100, sinks=sinks),
        # A user's functions traced into the kernel at global positions (q_offset moves them).
        "mask_fn": dict(mask_fn=_stripes, q_offset=jnp.array([0, 9][:batch])),
        "score_fn": dict(
            score_fn=_alibi_huge_rows, key_value_seq_lengths=jnp.array([seq_k, 150][:batch])
        ),
        "mask_fn_score_fn_causal_softcap_sinks": dict(
            mask_fn=_stripes,
            score_fn=_alibi,
            is_causal=True,
            q_offset=jnp.array([3, 40][:batch]),
            logits_soft_cap=5.0,
            sinks=sinks,
        ),
    }


USER_FN_CASES = ("mask_fn", "score_fn", "mask_fn_score_fn_causal_softcap_sinks")


def _qkv(
    dtype=jnp.bfloat16,
    head_dim=64,
    head_dim_v=None,
    seq_q=T,
    seq_k=S,
    heads=N,
    kv_heads=K,
    seed=0,
    batch=B,
):
    return testing.random_qkv(
        jax.random.PRNGKey(seed),
        batch=batch,
        seq_q=seq_q,
        seq_k=seq_k,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        dtype=dtype,
    )


def _mosaic(*args, **kwargs):
    return chunkattn.dot_product_attention(
        *args, implementation="pallas_mosaic", config=CFG, **kwargs
    )


@pytest.fixture
def emulated(monkeypatch):
    """The public pallas_mosaic path with the kernel replaced by `mosaic.emulate` (any jax), and
    the Triton backward in the Pallas interpreter."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)


# ------------------------------------------------------------------------ the parts, on CPU


def _dense_mask(meta_case, seq_q, seq_k):
    """Boolean [B, T, S] from the documented semantics (DESIGN.md §2), in numpy int64."""
    causal, window, off, q_len, kv_len = meta_case
    i = np.arange(seq_q, dtype=np.int64)[None, :, None] + np.asarray(off, np.int64)[:, None, None]
    j = np.arange(seq_k, dtype=np.int64)[None, None, :]
    ok = np.ones((len(off), seq_q, seq_k), bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - window[0] <= j) & (j <= i + window[1])
    ok &= np.arange(seq_q)[None, :, None] < np.asarray(q_len)[:, None, None]
    ok &= j < np.asarray(kv_len)[:, None, None]
    return ok


def _meta(causal, window, off, q_len, kv_len):
    off = jnp.asarray(off, jnp.int32)
    lo, hi = masks.relative_bounds(masks.MaskSpec(causal, window), off)
    zero = jnp.zeros_like(off)
    cols = [off, jnp.asarray(q_len), jnp.asarray(kv_len), zero, zero, lo, hi, zero]
    return jnp.stack(cols, axis=1).astype(jnp.int32)


MAX = 2**31 - 1
RANGE_CASES = [
    (False, None, [0, 0], [256, 256], [256, 256]),
    (True, None, [0, 5], [256, 200], [256, 130]),
    (True, None, [-100, 300], [256, 256], [256, 256]),  # rows with no key; rows seeing all
    (False, (17, 3), [0, 40], [256, 99], [250, 256]),
    (True, (64, 0), [MAX - 5, -(2**31)], [256, 256], [256, 256]),  # offsets at the int32 ends
    (False, (MAX, MAX), [MAX, 7], [256, 256], [256, 256]),  # a window larger than anything
]


@pytest.mark.parametrize("case", RANGE_CASES)
def test_key_ranges_and_block_schedule_match_the_mask(case):
    seq_q, seq_k, bq, bk = 256, 256, 64, 64
    meta = _meta(*case)
    kstart, kend = map(np.asarray, mosaic.key_ranges(meta, seq_q, seq_k))
    want = _dense_mask(case, seq_q, seq_k)
    cols = np.arange(seq_k)[None, None, :]
    got = (cols >= kstart[..., None]) & (cols < kend[..., None])
    np.testing.assert_array_equal(got, want)
    _check_schedule(want, np.asarray(mosaic.block_schedule(kstart, kend, bq, bk)), bq, bk)


def _check_schedule(mask, sched, bq, bk, full_allowed=True):
    """Every allowed pair lies in a scheduled block; blocks a warpgroup runs unmasked are
    allowed for each of its rows and keys."""
    batch, seq_q, seq_k = mask.shape
    for b, t in itertools.product(range(batch), range(seq_q // (2 * bq))):
        lo, hi = sched[b, t, :2]
        tile = mask[b, t * 2 * bq : (t + 1) * 2 * bq]
        seen = np.nonzero(tile.any(axis=0))[0] // bk
        assert seen.size == 0 or (lo <= seen.min() and seen.max() < hi), (b, t, lo, hi)
        for w in range(2):
            flo, fhi = sched[b, t, 2 + 2 * w : 4 + 2 * w]
            assert lo <= flo <= fhi <= hi
            if not full_allowed:
                assert flo == fhi
            rows = tile[w * bq : (w + 1) * bq]
            for j in range(flo, fhi):
                assert rows[:, j * bk : (j + 1) * bk].all(), (b, t, w, j)


def test_block_schedule_with_segment_ids_skips_only_blocks_that_cannot_meet():
    from chunkattn.pallas.kernel_common import segment_ranges

    rng = np.random.default_rng(0)
    seq, bq, bk = 512, 64, 64
    for sort in (True, False):
        segq = _segments(rng, 2, seq, sort) * (1 if sort else 5)
        segk = segq if sort else _segments(rng, 2, seq, sort)
        meta = _meta(True, None, [0, 0], [seq, 300], [seq, seq])
        kstart, kend = mosaic.key_ranges(meta, seq, seq)
        lengths = meta[:, 1], meta[:, 2]
        seg = segment_ranges(segq, segk, *lengths, 2 * bq, bk, "q")
        sched = np.asarray(mosaic.block_schedule(kstart, kend, bq, bk, seg))
        ranged = _dense_mask((True, None, [0, 0], [seq, 300], [seq, seq]), seq, seq)
        mask = ranged & (np.asarray(segq)[:, :, None] == np.asarray(segk)[:, None, :])
        _check_schedule(mask, sched, bq, bk, full_allowed=False)
    if sort:  # packed documents: most block pairs are skipped
        assert (sched[..., 1] - sched[..., 0]).sum() < 0.6 * (seq // bk) * sched.shape[1] * 2


def test_soft_cap_in_exp2_form_matches_tanh():
    raw = jnp.concatenate([jnp.linspace(-50, 50, 2001), jnp.array([-1e4, 1e4, 0.0, 1e-6])])
    for cap in (1.0, 5.0, 30.0):
        got = mosaic.score_block(raw, 0.125, cap)
        want = cap * np.tanh(np.asarray(raw, np.float64) * 0.125 / cap) * np.log2(np.e)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6 * cap, rtol=1e-6)


def test_online_softmax_edge_cases():
    """A block with every key masked leaves a fresh row at (m, l) = (−inf, 0) with p = 0 and
    no NaN; `finish` gives 0 and lse −inf; a sink gives l = 1, output 0 and lse = the sink."""
    s = jnp.full((4, 8), -jnp.inf)
    m0, l0 = mosaic.initial_stats(jnp.full((4,), -jnp.inf))
    p, alpha, m, l = mosaic.softmax_step(s, m0, l0)
    assert not np.isnan(np.asarray(p)).any() and float(p.max()) == 0.0
    assert float(alpha.max()) == 0.0 and float(l.max()) == 0.0 and float(m.max()) == -np.inf
    out, lse = mosaic.finish(jnp.zeros((4, 16)), m, l)
    assert float(jnp.abs(out).max()) == 0.0 and bool(jnp.all(lse == -jnp.inf))
    sink = jnp.full((4,), 3.0)  # log2 domain
    m, l = mosaic.initial_stats(sink)
    _, _, m, l = mosaic.softmax_step(s, m, l)
    out, lse = mosaic.finish(jnp.zeros((4, 16)), m, l)
    np.testing.assert_allclose(np.asarray(lse), 3.0 * np.log(2.0), rtol=1e-6)
    # Large logits (f16's ±1e4 scaled): a row's weights stay finite and sum to 1.
    s = jnp.array([[1e4, -1e4, 9990.0, -jnp.inf]] * 4) * np.log2(np.e)
    p, _, m, l = mosaic.softmax_step(s, m0, l0)
    np.testing.assert_allclose(np.asarray(p.sum(1) / l), 1.0, rtol=1e-6)


def test_config_is_validated():
    for kwargs, field in [
        ({"block_q": 128}, "block_q"),
        ({"block_k": 96}, "block_k"),
        ({"num_stages": 1}, "num_stages"),
        ({"backward": "split"}, "backward"),
    ]:
        with pytest.raises(ValueError, match=f"MosaicConfig.{field}"):
            mosaic.MosaicConfig(**kwargs)


def test_shared_memory_of_the_default_blocks_fits():
    for h, hv in itertools.product(mosaic.HEAD_DIMS, repeat=2):
        bk = mosaic.MosaicConfig().resolve_block_k((h, hv))
        assert mosaic.smem_bytes((h, hv), 2, 64, bk, 2) + 4096 <= mosaic.SMEM_LIMIT, (h, hv)


def test_declines_what_it_does_not_implement(monkeypatch):
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    q, k, v = _qkv(seq_q=16, seq_k=16)
    declined = [
        ("a dense bias", dict(bias=jnp.zeros((16, 16)))),
        ("a dense mask", dict(mask=jnp.ones((16, 16), bool))),
        ("dropout", dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0))),
        ("MosaicConfig", dict(config=PallasConfig())),
    ]
    for feature, kwargs in declined:
        kwargs.setdefault("config", None)
        with pytest.raises(NotImplementedError, match=feature):
            chunkattn.dot_product_attention(q, k, v, implementation="pallas_mosaic", **kwargs)
    for feature, (dtype, h) in [
        ("float32 inputs", (jnp.float32, 64)),
        ("head dims 72", (jnp.bfloat16, 72)),
    ]:
        q, k, v = _qkv(dtype=dtype, head_dim=h, seq_q=16, seq_k=16)
        with pytest.raises(NotImplementedError, match=feature):
            chunkattn.dot_product_attention(q, k, v, implementation="pallas_mosaic")


def test_declines_user_functions_it_cannot_lower(monkeypatch):
    """Before any kernel is traced: operations Mosaic GPU cannot lower on the kernel's
    [64, block_k] arrays (pow, iota, bool not, a custom_jvp), closures over arrays, and any
    mask_fn / score_fn with the Mosaic backward; what it can lower is served."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
    q, k, v = _qkv(seq_q=16, seq_k=16)
    table = jnp.arange(16.0)
    declined = [
        ("operations pow", dict(score_fn=lambda s, b, h, i, j: s * 2.0 ** h.astype(s.dtype))),
        ("operations not \\(bool\\)", dict(mask_fn=lambda b, h, i, j: ~(i < j))),
        ("iota", dict(mask_fn=lambda b, h, i, j: j <= jnp.arange(i.shape[-1]))),
        ("custom_jvp_call", dict(score_fn=lambda s, b, h, i, j: jax.nn.relu(s))),
        ("closes over arrays", dict(score_fn=lambda s, b, h, i, j: s + table[0])),
    ]
    for feature, kwargs in declined:
        with pytest.raises(NotImplementedError, match=f"pallas_mosaic kernels .*{feature}"):
            _mosaic(q, k, v, **kwargs)
    for name in ("mask_fn", "score_fn"):
        fn = _stripes if name == "mask_fn" else _alibi
        with pytest.raises(NotImplementedError, match=f"{name} in the Mosaic backward"):
            _mosaic_bwd(q, k, v, **{name: fn})
    out = _mosaic(q, k, v, mask_fn=lambda b, h, i, j: (i + j) % 3 != 0, score_fn=_alibi)
    assert out.shape == q.shape


def test_user_function_check_tells_dtypes_apart():
    """rem lowers on int32 positions but not on float32 scores, bool converts to float32 but
    nothing converts to bool, erf and floor not at all: the check names the operations with
    their dtypes; the tests' own functions and an int32 floor division pass."""
    mosaic.check_user_fns(_stripes, _alibi, 64, 128)
    mosaic.check_user_fns(lambda b, h, i, j: i // 64 >= j // 64, None, 64, 128)
    for fn, words in [
        (lambda s, b, h, i, j: jax.lax.rem(s, 2.0), "rem (float32, float32)"),
        (lambda s, b, h, i, j: s + (s > 0).astype(jnp.float32), None),
        (lambda s, b, h, i, j: s * s.astype(bool), "convert_element_type (float32)"),
        (lambda s, b, h, i, j: jax.lax.erf(s), "erf (float32)"),
        (lambda s, b, h, i, j: jnp.floor(s), "floor (float32)"),
    ]:
        if words is None:
            mosaic.check_user_fns(None, fn, 64, 128)
            continue
        with pytest.raises(NotImplementedError, match=re.escape(words)):
            mosaic.check_user_fns(None, fn, 64, 128)


def test_blocks_build_only_the_positions_their_functions_read():
    """jax 0.11's Mosaic GPU finds no layout for an array nothing reads, so a block builds only
    the positions its user functions use: score_fn's in every block, mask_fn's in masked
    ones; an argument that feeds only dead code counts as unread."""
    from chunkattn.pallas.user_fns import used_arguments

    i32 = jax.ShapeDtypeStruct((64, 128), jnp.int32)

    def dead_head(b, h, i, j):
        _ = h + 1
        return j % 2 == 0

    assert used_arguments(dead_head, i32, i32, i32, i32) == (False, False, False, True)
    plan = mosaic.Plan(1.0, None, False, False, 1, (64, 64), 64, 128, 2, False)
    plan = plan._replace(mask_fn=dead_head, score_fn=lambda s, b, h, i, j: s + i)
    assert mosaic.used_positions(plan, (64, 128), True) == (False, False, True, True)
    assert mosaic.used_positions(plan, (64, 128), False) == (False, False, True, False)
    plan = plan._replace(score_fn=None)
    assert not mosaic.applies_user_fns(plan, False) and mosaic.applies_user_fns(plan, True)


def test_implementation_none_never_picks_it():
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        order = api._auto_order()
    assert "pallas_mosaic" not in order and "pallas" in order


def test_pallas_triton_is_the_triton_kernels():
    assert api._RUNNERS["pallas_triton"] is api._RUNNERS["pallas"]
    assert {"pallas_triton", "pallas_mosaic"} <= set(chunkattn.arguments.IMPLEMENTATIONS)


# (dtype, H, Hv, T, S) per case: together they cover both dtypes, Hv ≠ H and padded tails.
EMULATED = {
    "causal_gqa_sinks": (jnp.bfloat16, 64, 64, T, S),
    "window_offset_softcap_lengths": (jnp.float16, 128, 64, 130, 300),
    "segments_unsorted_lengths": (jnp.bfloat16, 64, 64, T, S),
    "empty_rows_sinks": (jnp.bfloat16, 64, 64, T, S),
    "mask_fn": (jnp.bfloat16, 64, 64, T, S),
    "score_fn": (jnp.float16, 128, 128, 130, 300),
    "mask_fn_score_fn_causal_softcap_sinks": (jnp.bfloat16, 64, 64, T, S),
}


@pytest.mark.parametrize("name", list(EMULATED))
def test_emulated_kernel_matches_reference(emulated, name):
    dtype, h, hv, seq_q, seq_k = EMULATED[name]
    q, k, v = _qkv(dtype, h, hv, seq_q=seq_q, seq_k=seq_k)
    kwargs = cases(seq_q=seq_q, seq_k=seq_k)[name]
    testing.assert_matches_reference(_mosaic, q, k, v, grads=False, **kwargs)


def test_emulated_gradients_through_the_triton_backward(emulated):
    """The Triton backward kernels on the Mosaic forward's residuals (out, lse, natural log
    from the natural-domain scores of a score_fn), causal, GQA, sinks, soft cap; they trace
    the mask_fn and score_fn themselves (the default pairing: the Mosaic backward declines
    them). The log2-domain forward's residuals meet a backward in
    test_emulated_mosaic_backward_matches_reference."""
    q, k, v = _qkv(seq_q=128, seq_k=128, heads=2, kv_heads=1, batch=1)
    kwargs = cases(batch=1, seq_q=128, seq_k=128, heads=2)["mask_fn_score_fn_causal_softcap_sinks"]
    testing.assert_matches_reference(_mosaic, q, k, v, **kwargs)


def test_mask_fn_leaves_no_block_whole():
    """With a mask_fn the schedule's unmasked phase is empty ([flo, fhi) = [lo, lo)) while the
    causal/window block skipping of [lo, hi) is kept."""
    meta = _meta(True, None, [0, 40], [256, 256], [256, 256])
    kstart, kend = mosaic.key_ranges(meta, 256, 256)
    plain = np.asarray(mosaic.block_schedule(kstart, kend, 64, 64))
    sched = np.asarray(mosaic.block_schedule(kstart, kend, 64, 64, none_whole=True))
    np.testing.assert_array_equal(sched[..., :2], plain[..., :2])
    assert (plain[..., 3] > plain[..., 2]).any()  # without one some blocks are whole
    for w in range(2):
        assert (sched[..., 2 + 2 * w] == sched[..., 0]).all()
        assert (sched[..., 3 + 2 * w] == sched[..., 0]).all()
    assert sched[0, 0, 1] == 2  # causal: rows 0..127 of batch 0 read key blocks 0 and 1 only


# ---------------------------------------------- the Mosaic backward (mosaic_backward.py), on CPU

BWD_CFG = mosaic.MosaicConfig(block_k=64, backward=mosaic_backward.MosaicBackwardConfig())


ATOMIC_CFG = mosaic.MosaicConfig(
    block_k=64, backward=mosaic_backward.MosaicBackwardConfig(dq="atomic")
)
BWD_CFGS = {"kernel": BWD_CFG, "atomic": ATOMIC_CFG}


def _mosaic_bwd(*args, dq="kernel", **kwargs):
    return chunkattn.dot_product_attention(
        *args, implementation="pallas_mosaic", config=BWD_CFGS[dq], **kwargs
    )


def _check_q_schedule(mask, sched, bq, bkv, full_allowed=True):
    """Every allowed pair lies in a scheduled query block of its key tile; the blocks a
    warpgroup runs unmasked are allowed for each of its keys and each row."""
    batch, seq_q, seq_k = mask.shape
    for b, t in itertools.product(range(batch), range(seq_k // (2 * bkv))):
        lo, hi = sched[b, t, :2]
        tile = mask[b, :, t * 2 * bkv : (t + 1) * 2 * bkv]
        seen = np.nonzero(tile.any(axis=1))[0] // bq
        assert lo <= hi, (b, t)
        assert seen.size == 0 or (lo <= seen.min() and seen.max() < hi), (b, t, lo, hi)
        assert seen.size > 0 or lo == hi, (b, t, lo, hi)  # no row sees the tile: no block
        for w in range(2):
            flo, fhi = sched[b, t, 2 + 2 * w : 4 + 2 * w]
            assert lo <= flo <= fhi <= hi
            if not full_allowed:
                assert flo == fhi
            keys = tile[:, w * bkv : (w + 1) * bkv]
            for i in range(flo, fhi):
                assert keys[i * bq : (i + 1) * bq].all(), (b, t, w, i)


@pytest.mark.parametrize("case", RANGE_CASES)
def test_q_block_schedule_of_the_dkdv_kernel_matches_the_mask(case):
    seq_q, seq_k, bq, bkv = 256, 256, 64, 64
    kstart, kend = mosaic.key_ranges(_meta(*case), seq_q, seq_k)
    sched = mosaic_backward.q_block_schedule(kstart, kend, seq_k, bq, bkv)
    mask = _dense_mask(case, seq_q, seq_k)
    _check_q_schedule(mask, np.asarray(sched), bq, bkv)
    if case[0] and case[1] is None and case[2] == [0, 5]:  # causal: blocks above are skipped
        blocks = np.asarray(sched[..., 1] - sched[..., 0])
        assert blocks[0].tolist() == [4, 2], blocks  # tile 1 (keys 128..255) from block 2
        assert np.asarray(sched[0, :, 2:6]).tolist() == [[1, 4, 2, 4], [3, 4, 4, 4]]


def test_q_block_schedule_with_segment_ids():
    from chunkattn.pallas.kernel_common import segment_ranges

    rng = np.random.default_rng(1)
    seq, bq, bkv = 256, 64, 64
    case = (True, None, [0, 0], [seq, 200], [seq, 170])
    for sort in (True, False):
        segq = _segments(rng, 2, seq, sort)
        segk = segq if sort else _segments(rng, 2, seq, sort)
        meta = _meta(*case)
        kstart, kend = mosaic.key_ranges(meta, seq, seq)
        seg = segment_ranges(segq, segk, meta[:, 1], meta[:, 2], bq, 2 * bkv, "k")
        sched = mosaic_backward.q_block_schedule(kstart, kend, seq, bq, bkv, seg)
        mask = _dense_mask(case, seq, seq)
        mask &= np.asarray(segq)[:, :, None] == np.asarray(segk)[:, None, :]
        _check_q_schedule(mask, np.asarray(sched), bq, bkv, full_allowed=False)


def _block_reference(q, k, v, do, dlse, scale, cap, allowed):
    """(P, dS) of one block by autodiff of the float32 attention: dS = d loss/d(scale·q·kᵀ)
    for loss = Σ dO∘O + Σ dlse·lse."""

    def loss(x):
        s = x if cap is None else cap * jnp.tanh(x / cap)
        s = jnp.where(allowed, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=1)
        p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
        p = jnp.where(jnp.isfinite(lse)[:, None], p, 0.0)
        return jnp.sum(do * (p @ v)) + jnp.sum(jnp.where(jnp.isfinite(lse), dlse * lse, 0.0)), (
            p,
            lse,
        )

    x = scale * (q @ k.T)
    (_, (p, lse)), ds = jax.value_and_grad(loss, has_aux=True)(x)
    return p, ds, lse


@pytest.mark.parametrize("cap", [None, 5.0])
def test_block_grads_match_autodiff(cap):
    """P = 2^(s₂ − lse₂) and dS = P∘(dP − D)(1 − t²) of `block_grads` (the dQ kernel's) and of
    `block_grads_t` (the dK/dV kernel's transposed block, with the soft cap's slope also
    recomputed from P as that kernel does) against autodiff of float32 attention on one block
    with a mask; a row that sees no key (lse −inf, lse₂ +inf) gets P = dS = 0."""
    rng = np.random.default_rng(3)
    bq, bk, h, scale = 64, 64, 32, 0.3
    q, k, v, do = (jnp.asarray(rng.normal(size=(n, h)), jnp.float32) for n in (bq, bk, bk, bq))
    dlse = jnp.asarray(rng.normal(size=bq), jnp.float32)
    ks = jnp.asarray(rng.integers(0, 40, bq), jnp.int32).at[5].set(bk)  # row 5: no key
    ke = jnp.minimum(ks + jnp.asarray(rng.integers(1, 50, bq), jnp.int32), bk)
    cols = jnp.arange(bk)[None, :]
    allowed = (cols >= ks[:, None]) & (cols < ke[:, None])
    reference = jax.jit(_block_reference, static_argnums=(5, 6))  # one compile, not op by op
    p_ref, ds_ref, lse = reference(q, k, v, do, dlse, scale, cap, allowed)
    out = p_ref @ v
    lse2 = jnp.where(jnp.isfinite(lse), lse * np.log2(np.e), jnp.inf)
    delta = jnp.sum(do * out, axis=1) - dlse
    plan = mosaic.Plan(scale, cap, False, False, 1, (h, h), 64, bk, 2, False)
    raw, dp = q @ k.T, do @ v.T
    mask = lambda s: mosaic.mask_block(s, jnp.broadcast_to(cols, s.shape), ks, ke)  # noqa: E731
    p, ds = jax.jit(mosaic_backward.block_grads, static_argnums=(4, 5))(
        raw, dp, lse2, delta, plan, mask
    )
    mask_t = lambda s: mosaic_backward.mask_block_t(s, jnp.arange(bk), ks, ke)  # noqa: E731

    @jax.jit
    def transposed(raw_t, dp_t, lse2, delta):
        pt, dst = mosaic_backward.block_grads_t(raw_t, dp_t, lse2, delta, plan, mask_t)
        slope = None if cap is None else mosaic_backward.cap_slope(pt, lse2, cap)
        return pt, dst, mosaic_backward.dscores_t(pt, dp_t, delta, slope)

    pt, dst, dst_kernel = transposed(raw.T, dp.T, lse2, delta)
    checks = [(p, p_ref), (ds, ds_ref), (pt.T, p_ref), (dst.T, ds_ref), (dst_kernel.T, ds_ref)]
    for got, want in checks:
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    assert float(jnp.abs(p[5]).max()) == 0.0 and float(jnp.abs(ds[5]).max()) == 0.0


def test_backward_config_is_validated_and_opt_in():
    for kwargs, field in [
        ({"block_q": 32}, "block_q"),
        ({"block_kv": 128}, "block_kv"),
        ({"block_k_dq": 256}, "block_k_dq"),
        ({"num_stages": 5}, "num_stages"),
        ({"dq": "atomics"}, "dq"),
    ]:
        with pytest.raises(ValueError, match=f"MosaicBackwardConfig.{field}"):
            mosaic_backward.MosaicBackwardConfig(**kwargs)
    with pytest.raises(ValueError, match="dq='atomic'.*block_q=128"):
        mosaic_backward.MosaicBackwardConfig(dq="atomic", block_q=128)
    assert mosaic_backward.MosaicBackwardConfig().dq == "kernel"  # until a GPU has timed both
    assert isinstance(mosaic.MosaicConfig().backward, PallasConfig)  # Triton's by default
    cfg = mosaic.MosaicConfig(backward=mosaic_backward.MosaicBackwardConfig())
    assert isinstance(cfg.backward, mosaic_backward.MosaicBackwardConfig)


def test_backward_shared_memory_fits():
    for dq in mosaic_backward.DQ_FORMS:
        bp = mosaic_backward.plan_for(mosaic_backward.MosaicBackwardConfig(dq=dq))
        for dims in itertools.product(mosaic_backward.HEAD_DIMS, repeat=2):
            for kernel in ("dq", "dkdv"):
                need = mosaic_backward.smem_bytes(kernel, dims, 2, bp, interpret=True)
                assert need <= mosaic_backward.SMEM_BUDGET, (dq, kernel, dims)
    # Atomic dQ's dS and dQ buffers leave no room for a third ring stage at H=128: declined.
    bp = mosaic_backward.plan_for(mosaic_backward.MosaicBackwardConfig(dq="atomic", num_stages=3))
    assert mosaic_backward.smem_bytes("dkdv", (128, 128), 2, bp) > mosaic_backward.SMEM_BUDGET


def test_backward_declines_head_dim_256(monkeypatch):
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    q, k, v = _qkv(head_dim=256, seq_q=16, seq_k=16)
    with pytest.raises(NotImplementedError, match="head dims 256/256 in the Mosaic backward"):
        _mosaic_bwd(q, k, v)


@pytest.fixture
def emulated_bwd(monkeypatch):
    """pallas_mosaic with both kernels replaced by their jnp emulations (any jax)."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
    calls = []

    def launch(*args):
        calls.append(args[0])
        return mosaic_backward.emulate(*args)

    monkeypatch.setattr(mosaic_backward, "launch", launch)
    return calls


@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
def test_emulated_mosaic_backward_matches_reference(emulated_bwd, dq):
    """The two backward kernels' loops (GQA summed over the group, causal skipping, sinks,
    padded tails: T=S=130 pads to 256) through the public API's custom_vjp; with atomic dQ the
    dK/dV kernel's loops alone (dQ summed over its programs' float32 dS·K)."""
    q, k, v = _qkv(seq_q=130, seq_k=130, heads=2, kv_heads=1, batch=1)
    kwargs = cases(batch=1, seq_q=130, seq_k=130, heads=2)["causal_gqa_sinks"]
    testing.assert_matches_reference(functools.partial(_mosaic_bwd, dq=dq), q, k, v, **kwargs)
    assert emulated_bwd and emulated_bwd[0].backward.dq == dq  # the Mosaic backward ran


def test_mosaic_backward_lowers_for_cuda(monkeypatch):
    """The three Mosaic GPU kernels of forward + backward lower for CUDA on any host (Pallas →
    Mosaic GPU MLIR runs here; ptxas is bench/compile_report.py's); with atomic dQ two (no dQ
    kernel; jax's Ref discharge renames the dK/dV kernel, mosaic_compat.kernel); the default
    config keeps the Triton backward (one Mosaic kernel)."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    q, k, v = _qkv(seq_q=300, seq_k=300)
    names = ("chunkattn_mosaic_fwd", "chunkattn_mosaic_bwd_dq", "chunkattn_mosaic_bwd_dkdv")
    for cfg, want in [(BWD_CFG, 3), (ATOMIC_CFG, 2), (mosaic.MosaicConfig(), 1)]:

        def loss(q, k, v, cfg=cfg):
            out = chunkattn.dot_product_attention(
                q, k, v, is_causal=True, implementation="pallas_mosaic", config=cfg
            )
            return jnp.sum(out.astype(jnp.float32))

        text = _lowered_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
        assert text.count("custom_call @mosaic_gpu_v2(") == want, cfg
        if cfg is ATOMIC_CFG:
            assert names[0] in text and names[1] not in text
        else:
            assert [n for n in names if n in text] == list(names[:want]), cfg


@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
def test_mosaic_backward_lowers_for_cuda_under_vmap(monkeypatch, dq):
    """vmap of the gradient, queries mapped and keys/values not: plgpu.kernel's rule adds a
    grid axis; the atomic form's dQ Ref (jax's `run_state`, no batching rule) folds the mapped
    axis into the batch (`mosaic_backward._fold_vmap`); a map of size 0 launches nothing."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    q, k, v = _qkv(seq_q=300, seq_k=300)

    def loss(q, k, v):
        return jnp.sum(_mosaic_bwd(q, k, v, dq=dq, is_causal=True).astype(jnp.float32))

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None))
    text = _lowered_for_cuda(grads, jnp.stack([q, 2 * q]), k, v)
    assert text.count("custom_call @mosaic_gpu_v2(") == {"kernel": 3, "atomic": 2}[dq]
    # A map of size 0 launches nothing (Mosaic's TMA copies reject an empty memref:
    # mosaic_compat.skips_empty_maps) and gives empty gradients, as jax.vmap of jnp does.
    text = _lowered_for_cuda(grads, q[None][:0], k, v)
    assert "mosaic_gpu_v2" not in text
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")  # run on the CPU, emulated
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
    monkeypatch.setattr(mosaic_backward, "launch", mosaic_backward.emulate)
    dq_, dk, dv = jax.jit(grads)(q[None][:0], k, v)
    assert (dq_.shape, dk.shape, dv.shape) == ((0, *q.shape), (0, *k.shape), (0, *v.shape))


def _lowered_for_cuda(fn, *args) -> str:
    mesh = jax.sharding.AbstractMesh(
        (1,),
        ("gpu",),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
        ),
    )
    checks = [
        jax.export.DisabledSafetyCheck.custom_call(name)
        for name in ("mosaic_gpu_v2", "__gpu$xla.gpu.triton")
    ]
    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
        jax.sharding.use_abstract_mesh(mesh),
    ):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    return exported.mlir_module()


# ------------------------------------------------------------------ the Mosaic GPU interpreter


@pytest.fixture
def interpreter_threads():
    """Skips unless XLA:CPU has the threads the interpreter needs (tests/conftest.py sets
    PJRT_NPROC=5 unless the caller set PJRT_NPROC or NPROC).

    These tests hung before (issue 21; bench/NOTES.md v13): on this 2-core machine XLA:CPU had
    2 threads, and the interpreter blocks them. It runs each of a kernel's 3 warpgroups as its
    own XLA:CPU program, started from a host callback of the program that launched the kernel
    and waited for there, and a warpgroup at a barrier waits in a host callback too. XLA:CPU
    runs such callbacks on its intra-op pool (it offloads blocking thunks, and splits a
    program's ready thunks onto it), so the launcher and one warpgroup held both threads while
    a third warpgroup's program sat queued behind them, never started, and the second waited
    for its arrivals: in gdb, the pool's two threads in the launcher's `_thread_map_callback`
    and a `_barrier_wait`, two warpgroup threads in `BlockUntilReady` of their programs.
    PJRT_NPROC decides it, the kernels' barriers do not (in the forward, dQ and dK/dV kernels
    all three warpgroups step over the same blocks, so none skips a phase, on an empty schedule
    neither): on the kernels of 613ec93 the backward's window case hung 8 of 8 times with 2
    threads and passed with 5 and 8, the causal case (which passed with 2) hung with 1; with 5
    threads (1 launcher + 3 warpgroups can hold 4) every case of both tests passed every time
    (bench/NOTES.md v13)."""
    from chunkattn.pallas import mosaic_compat

    threads, need = mosaic_compat.xla_cpu_threads(), mosaic_compat.INTERPRETER_CPU_THREADS
    if threads < need:
        pytest.skip(f"the interpreter can deadlock with {threads} XLA:CPU threads (< {need})")


@in_the_interpreter
@pytest.mark.parametrize(
    "name",
    [
        "causal_gqa_sinks",
        "window_offset_softcap_lengths",
        "segments_unsorted_lengths",
        "empty_rows_sinks",
        *USER_FN_CASES,
    ],
)
def test_kernel_in_the_interpreter_matches_emulation_and_reference(
    monkeypatch, interpreter_threads, name
):
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    q, k, v = _qkv()
    kwargs = cases()[name]
    got = _mosaic(q, k, v, return_lse=True, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(mosaic, "launch", mosaic.emulate)
        want = _mosaic(q, k, v, return_lse=True, **kwargs)
    for g, w in zip(got, want, strict=True):  # the same arithmetic, up to summation order
        assert testing.relative_error(g, w) <= 0.25 * testing.tolerance(jnp.bfloat16), name
    testing.assert_matches_reference(_mosaic, q, k, v, grads=name == "causal_gqa_sinks", **kwargs)


@in_the_interpreter
# Atomic dQ: the dK/dV kernel alone, its dQ read-added through shared memory under the
# interpreter (mosaic_compat.reduce_add_to_gmem: the TMA reduction itself runs only on a GPU),
# at H=128 split over both warpgroups' dS (the window case).
@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
@pytest.mark.parametrize(
    "name, dims",
    [
        ("causal_gqa_sinks", (64, 64)),
        ("window_offset_softcap_lengths", (128, 64)),
        ("segments_unsorted_lengths", (64, 64)),
        ("empty_rows_sinks", (64, 128)),
    ],
)
def test_backward_kernels_in_the_interpreter_match_emulation_and_reference(
    monkeypatch, interpreter_threads, name, dims, dq
):
    """The dQ and dK/dV kernels themselves (TMA rings, barriers, warpgroups; the forward is
    emulated, its kernel has the test above): gradients within 1/4 of the bf16 gradient
    tolerance of the emulated kernels, and the reference's. Under `jax.jit(jax.grad)` the window
    case hung on XLA:CPU's 2 threads, not on the kernels' barriers: `interpreter_threads`."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
    seq_q, seq_k = (130, 300) if name.startswith("window") else (T, S)
    q, k, v = _qkv(jnp.bfloat16, *dims, seq_q=seq_q, seq_k=seq_k, batch=1)
    kwargs = cases(batch=1, seq_q=seq_q, seq_k=seq_k)[name]
    proj = jax.random.normal(jax.random.PRNGKey(5), (1, seq_q, N, dims[1]), jnp.float32)

    def grads():
        def loss(q, k, v):
            return jnp.sum(_mosaic_bwd(q, k, v, dq=dq, **kwargs).astype(jnp.float32) * proj)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = grads()
    with monkeypatch.context() as m:
        m.setattr(mosaic_backward, "launch", mosaic_backward.emulate)
        want = grads()
    tol = 0.25 * testing.tolerance(jnp.bfloat16, grad=True)
    for g, w, what in zip(got, want, "qkv", strict=True):
        assert testing.relative_error(g, w) <= tol, (name, what)
        assert float(jnp.abs(w.astype(jnp.float32)).max()) > 0, (name, what)  # not vacuous
    testing.assert_matches_reference(functools.partial(_mosaic_bwd, dq=dq), q, k, v, **kwargs)


@in_the_interpreter
@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
def test_backward_kernels_under_vmap_in_the_interpreter(monkeypatch, interpreter_threads, dq):
    """vmap of the gradient, queries mapped over 2 and keys/values not (the atomic form folds
    the mapped axis into the batch: one launch of twice the programs): each map index's
    gradients as the emulated kernels' for that index alone."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
    q, k, v = _qkv(jnp.bfloat16, 64, 64)  # batch 2: the fold's order of map index and batch
    qs = jnp.stack([q, jnp.flip(q, axis=1)])
    kwargs = cases()["causal_gqa_sinks"]

    def loss(q, k, v):
        out = _mosaic_bwd(q, k, v, dq=dq, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(qs, k, v)
    with monkeypatch.context() as m:
        m.setattr(mosaic_backward, "launch", mosaic_backward.emulate)
        want = [jax.jit(grad)(qs[i], k, v) for i in range(2)]
    tol = 0.25 * testing.tolerance(jnp.bfloat16, grad=True)
    for i in range(2):
        for g, w, what in zip(got, want[i], "qkv", strict=True):
            assert testing.relative_error(g[i], w) <= tol, (i, what)
            assert float(jnp.abs(w.astype(jnp.float32)).max()) > 0, (i, what)  # not vacuous


# --------------------------------------------------------------------------------- on a GPU

GPU_FEATURES = ["full", "causal", *cases()]
GPU_HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (128, 64)]
# Every feature at bf16 H=128; every head dim with the two richest feature sets at bf16 and with
# causal at f16: 20 compiles of forward and backward, within gpu_session.sh's step.
GPU_CASES = sorted(
    {(name, (128, 128), "bf16") for name in GPU_FEATURES}
    | {
        (n, d, "bf16")
        for n in ("causal_gqa_sinks", "window_offset_softcap_lengths")
        for d in GPU_HEAD_DIMS
    }
    | {("causal", d, "f16") for d in GPU_HEAD_DIMS}
)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
@pytest.mark.parametrize(
    "name, dims, dtype", GPU_CASES, ids=[f"{n}-h{d[0]}_{d[1]}-{t}" for n, d, t in GPU_CASES]
)
def test_gpu_matches_reference(name, dims, dtype):
    dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16}[dtype]
    seq_q, seq_k = 1000, 1100
    kw = {"full": {}, "causal": dict(is_causal=True), **cases(seq_q=seq_q, seq_k=seq_k)}[name]
    seed = sum(map(ord, name))  # fixed per feature (str hashes vary between runs)
    q, k, v = _qkv(dtype, dims[0], dims[1], seq_q=seq_q, seq_k=seq_k, seed=seed)

    def run(*args, **kwargs):
        return chunkattn.dot_product_attention(*args, implementation="pallas_mosaic", **kwargs)

    testing.assert_matches_reference(run, q, k, v, **kw)


# Every feature at bf16 H=128; the richest feature sets at every head dim pair it serves and
# causal at f16: the Mosaic backward's first GPU run (bench/gpu_session.sh mosaic_bwd).
BWD_GPU_HEAD_DIMS = [(64, 64), (128, 128), (128, 64), (64, 128)]
BWD_GPU_CASES = sorted(
    {(name, (128, 128), "bf16") for name in GPU_FEATURES if name not in USER_FN_CASES}
    | {
        (n, d, "bf16")
        for n in ("causal_gqa_sinks", "window_offset_softcap_lengths")
        for d in BWD_GPU_HEAD_DIMS
    }
    | {("causal", d, "f16") for d in BWD_GPU_HEAD_DIMS}
)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
@pytest.mark.parametrize(
    "name, dims, dtype", BWD_GPU_CASES, ids=[f"{n}-h{d[0]}_{d[1]}-{t}" for n, d, t in BWD_GPU_CASES]
)
def test_gpu_mosaic_backward_matches_reference(name, dims, dtype, dq):
    """Both dQ forms; atomic's float32 TMA reduce-adds run nowhere else (the interpreter has
    none)."""
    dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16}[dtype]
    seq_q, seq_k = 1000, 1100
    kw = {"full": {}, "causal": dict(is_causal=True), **cases(seq_q=seq_q, seq_k=seq_k)}[name]
    seed = sum(map(ord, name))
    q, k, v = _qkv(dtype, dims[0], dims[1], seq_q=seq_q, seq_k=seq_k, seed=seed)
    cfg = mosaic.MosaicConfig(backward=mosaic_backward.MosaicBackwardConfig(dq=dq))

    def run(*args, **kwargs):
        return chunkattn.dot_product_attention(
            *args, implementation="pallas_mosaic", config=cfg, **kwargs
        )

    testing.assert_matches_reference(run, q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
@pytest.mark.parametrize("dq", mosaic_backward.DQ_FORMS)
def test_gpu_mosaic_backward_under_vmap_matches_each_index(dq):
    """vmap of the gradient, queries mapped and keys/values not: the atomic form's fold of the
    mapped axis into the batch (`mosaic_backward._fold_vmap`) with the real TMA reduce-adds;
    each index as the same kernels without vmap."""
    q, k, v = _qkv(jnp.bfloat16, 128, 128, seq_q=1000, seq_k=1100, seed=7)
    qs = jnp.stack([q, jnp.flip(q, axis=1)])
    cfg = mosaic.MosaicConfig(backward=mosaic_backward.MosaicBackwardConfig(dq=dq))

    def loss(q, k, v):
        out = chunkattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="pallas_mosaic", config=cfg
        ).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    got = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(qs, k, v)
    tol = 0.25 * testing.tolerance(jnp.bfloat16, grad=True)  # float32 atomics: sum order only
    for i in range(2):
        for g, w, what in zip(got, grad(qs[i], k, v), "qkv", strict=True):
            assert testing.relative_error(g[i], w) <= tol, (i, what)
