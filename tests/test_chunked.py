"""The chunked core: the shared suite, jit/no-jit variants, summaries, memory and properties."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from attention_suite import AttentionSuite, mask_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chunkattn
from chunkattn import masks, testing
from chunkattn.summary import merge_stacked, output_delta


class TestChunked(AttentionSuite):
    implementation = "chunked"
    config = chunkattn.ChunkConfig(q_chunk_size=8, kv_chunk_size=16)


class TestChunkedOddChunks(AttentionSuite):
    """Chunks that divide nothing, and a chunk larger than the sequence (clipped)."""

    implementation = "chunked"
    config = chunkattn.ChunkConfig(q_chunk_size=7, kv_chunk_size=300)

    # The full suite already runs with regular chunks: one mask-matrix shape is enough here.
    mask_shapes = ((19, 41),)
    test_heads = test_dtypes = test_vmap = test_no_retrace = None
    test_sinks_with_every_mask_kind = None


class TestXla(AttentionSuite):
    implementation = "xla"
    config = None
    mask_shapes = ((37, 37),)


class ChunkedVariantsTest(chex.TestCase):
    """Same results with and without jit (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("none", "causal_window", "segment_pair", "everything")
    def test_jit_and_no_jit(self, name):
        T, S = 19, 41
        kwargs = dict(mask_cases(T, S)[name])
        bias = kwargs.pop("bias", None)
        q, k, v = testing.random_qkv(
            jax.random.PRNGKey(0), seq_q=T, seq_k=S, num_heads=4, num_kv_heads=2, head_dim=16
        )
        cfg = chunkattn.ChunkConfig(8, 16)

        @self.variant
        def f(q, k, v, bias):
            return chunkattn.dot_product_attention(q, k, v, bias, config=cfg, **kwargs)

        want = chunkattn.reference_attention(q, k, v, bias, **kwargs)
        got = f(q, k, v, bias)
        chex.assert_shape(got, (2, T, 4, 16))
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunking_does_not_change_the_result():
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(1), seq_q=50, seq_k=61, num_heads=4, num_kv_heads=1, head_dim=16
    )
    kw = dict(is_causal=True, q_offset=11, dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(3))
    outs = [
        chunkattn.dot_product_attention(q, k, v, config=chunkattn.ChunkConfig(tq, tk), **kw)
        for tq, tk in [(8, 8), (16, 5), (64, 64), (1, 61)]
    ]
    for o in outs[1:]:
        chex.assert_trees_all_close(o, outs[0], atol=2e-6, rtol=2e-6)


def test_dropout_rate_statistics():
    # With uniform scores, out = mean over kept keys · 1/(1−rate): the kept fraction is visible.
    T = S = 256
    q = jnp.zeros((1, T, 1, 8))
    v = jnp.ones((1, S, 1, 1))
    for rate in (0.1, 0.5):
        out = chunkattn.dot_product_attention(
            q,
            q,
            v,
            dropout_rate=rate,
            dropout_rng=jax.random.PRNGKey(0),
            config=chunkattn.ChunkConfig(64, 64),
        )
        kept = float(jnp.mean(out)) * (1 - rate)
        assert abs(kept - (1 - rate)) < 0.01, (rate, kept)


def test_backward_delta_is_a_float32_sum_not_a_matmul():
    """D = rowsum(dO ∘ O) − dlse feeds every dS: it must not become a dot (TF32 on GPU,
    bfloat16 passes on TPU at default precision), whatever the input dtype."""
    out, dout = (
        jax.random.normal(jax.random.PRNGKey(i), (2, 5, 3, 8), jnp.bfloat16) for i in (0, 1)
    )
    dlse = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5))
    jaxpr = str(jax.make_jaxpr(output_delta)(out, dout, dlse))
    assert "dot_general" not in jaxpr, jaxpr
    want = np.einsum("btnh,btnh->bnt", np.float64(out), np.float64(dout)) - np.float64(dlse)
    np.testing.assert_allclose(output_delta(out, dout, dlse), want, rtol=1e-6, atol=1e-6)
    assert output_delta(out, dout, dlse).dtype == jnp.float32


def test_summarize_and_merge_equal_full_attention():
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(2), seq_q=12, seq_k=40, num_heads=4, num_kv_heads=2, head_dim=8
    )
    parts = [chunkattn.summarize(q, k[:, a:b], v[:, a:b]) for a, b in [(0, 7), (7, 30), (30, 40)]]
    merged = chunkattn.merge(chunkattn.merge(parts[0], parts[1]), parts[2])
    full = chunkattn.summarize(q, k, v)
    chex.assert_trees_all_close(merged.output(), full.output(), atol=1e-6)
    ref, ref_lse = chunkattn.reference_attention(q, k, v, return_lse=True)
    chex.assert_trees_all_close(merged.output(), ref, atol=1e-5)
    chex.assert_trees_all_close(merged.lse(), ref_lse, atol=1e-5)
    # The empty summary is merge's identity, and a masked-out chunk finishes as 0 / −inf.
    empty = chunkattn.ChunkSummary.empty(2, 4, 12, 8)
    chex.assert_trees_all_close(chunkattn.merge(empty, full).output(), full.output())
    none = chunkattn.summarize(q, k, v, mask=jnp.zeros((12, 40), bool))
    assert np.all(np.asarray(none.output()) == 0) and np.all(np.isneginf(np.asarray(none.lse())))
    # merge_stacked, the n-ary merge, equals the pairwise merges; an empty part changes nothing.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts, none)
    chex.assert_trees_all_close(merge_stacked(stacked).output(), merged.output(), atol=1e-6)
    chex.assert_trees_all_close(merge_stacked(stacked).lse(), merged.lse(), atol=1e-6)
    all_empty = merge_stacked(jax.tree.map(lambda *xs: jnp.stack(xs), none, none))
    assert np.all(np.asarray(all_empty.output()) == 0)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("causal", [True, False])
def test_memory_grows_linearly(causal):
    """Compiled temp memory of forward and forward+backward grows linearly in T; dense grows T²."""

    def measure(impl, T):
        q = jax.ShapeDtypeStruct((1, T, 4, 64), jnp.float32)
        cfg = chunkattn.ChunkConfig(128, 128) if impl == "chunked" else None
        fwd = lambda q, k, v: chunkattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl, config=cfg
        )
        loss = lambda q, k, v: jnp.sum(fwd(q, k, v))
        return _temp_bytes(fwd, q, q, q), _temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)

    sizes = (1024, 2048, 4096)
    chunked = [measure("chunked", T) for T in sizes]
    q_bytes = [T * 4 * 64 * 4 for T in sizes]
    for (fwd, fwdbwd), qb in zip(chunked, q_bytes, strict=True):
        assert fwd <= 4 * qb and fwdbwd <= 4 * qb, (fwd, fwdbwd, qb)
    for i in range(1, len(sizes)):
        for j in range(2):
            ratio = chunked[i][j] / max(chunked[i - 1][j], 1)
            assert ratio < 2.3, f"chunked temp grew {ratio:.2f}x when T doubled: {chunked}"
    dense = [measure("xla", T) for T in sizes[:2]]
    assert dense[1][1] / dense[0][1] > 3.5, f"dense should grow quadratically: {dense}"


_MASKS = ("none", "causal", "causal_window", "segment_pair", "kv_lengths", "mask_ts", "everything")


# Each example compiles its own chunking: 4 in the default run (about 17 s), more with the
# fuzz's long profile (CHUNKATTN_FUZZ=long, tests/test_fuzz.py).
@settings(
    max_examples=4 if os.environ.get("CHUNKATTN_FUZZ", "ci") == "ci" else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    T=st.integers(1, 40),
    S=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2, 4]),
    tq=st.integers(1, 20),
    tk=st.integers(1, 20),
    masks=st.lists(st.sampled_from(_MASKS), min_size=1, max_size=3, unique=True),
)
def test_random_shapes_and_masks(T, S, kv_heads, tq, tk, masks):
    kwargs: dict = {}
    for name in masks:
        kwargs.update(mask_cases(T, S)[name])
    if "q_offset" in kwargs and not isinstance(kwargs["q_offset"], int):
        kwargs["q_offset"] = 0
    bias = kwargs.pop("bias", None)
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(T * 41 + S),
        seq_q=T,
        seq_k=S,
        num_heads=4,
        num_kv_heads=kv_heads,
        head_dim=8,
    )
    fn = lambda *a, **kw: chunkattn.dot_product_attention(
        *a, config=chunkattn.ChunkConfig(tq, tk), **kw
    )
    testing.assert_matches_reference(fn, q, k, v, bias, **kwargs)


def test_block_classification_causal_and_window():
    """Ranges of non-empty and full blocks: the loops compute exactly the blocks that matter."""
    from chunkattn import masks

    arr = masks.MaskArrays(q_offset=jnp.zeros((2,), jnp.int32))
    causal = masks.MaskSpec(is_causal=True)
    lo, hi = masks.kv_chunk_range(causal, arr, 24, 8, 8, 8)  # rows 24..31
    assert (int(lo), int(hi)) == (0, 4)
    flo, fhi = masks.kv_full_range(causal, arr, 24, 8, 8, lo, hi, False)
    assert (int(flo), int(fhi)) == (0, 3)  # keys 0..23 seen by every row; chunk 3 is diagonal
    lo, hi = masks.q_chunk_range(causal, arr, 16, 8, 8, 8)  # keys 16..23
    assert (int(lo), int(hi)) == (2, 8)
    flo, fhi = masks.q_full_range(causal, arr, 16, 8, 8, lo, hi, False)
    assert (int(flo), int(fhi)) == (3, 8)
    window = masks.MaskSpec(window=(8, 0))  # rows 24..31 see keys 16..31
    lo, hi = masks.kv_chunk_range(window, arr, 24, 8, 8, 8)
    assert (int(lo), int(hi)) == (2, 4)
    flo, fhi = masks.kv_full_range(window, arr, 24, 8, 8, lo, hi, False)
    assert int(fhi) <= int(flo)  # both blocks are partial
    wide = masks.MaskSpec(window=(16, 0))  # rows 24..31 see keys 8..31: chunk 2 is full
    lo, hi = masks.kv_chunk_range(wide, arr, 24, 8, 8, 8)
    assert (int(lo), int(hi)) == (1, 4)
    assert tuple(map(int, masks.kv_full_range(wide, arr, 24, 8, 8, lo, hi, False))) == (2, 3)
    assert tuple(map(int, masks.kv_full_range(causal, arr, 24, 8, 8, 0, 4, True))) == (0, 3)


@pytest.mark.parametrize("tq,tk", [(1, 1), (2, 1), (1, 3)])
def test_chunks_of_one_slice_dense_masks_and_biases(tq, tk):
    """Regression (found by hypothesis): a chunk of size 1 must still slice a full mask dim."""
    q, k, v = testing.random_qkv(jax.random.PRNGKey(5), seq_q=5, seq_k=7, num_heads=2, head_dim=8)
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.6, (5, 7))
    bias = jax.random.normal(jax.random.PRNGKey(4), (1, 2, 5, 7))
    fn = lambda *a, **kw: chunkattn.dot_product_attention(
        *a, config=chunkattn.ChunkConfig(tq, tk), **kw
    )
    testing.assert_matches_reference(fn, q, k, v, bias, mask=mask)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestCudnnGPU(AttentionSuite):
    """jax.nn's cuDNN kernel through the one API: what it serves matches the reference; what
    it lacks (segments, mask_fn, float32, lse...) is declined by name and skipped."""

    implementation = "cudnn"
    config = None
    may_decline = True

    def check(self, q, k, v, bias=None, grads=True, **kwargs):
        # cuDNN returns no lse: compare the output and the input gradients only.
        def loss(f, q, k, v):
            return jnp.sum(jnp.sin(f(q, k, v, bias, **kwargs).astype(jnp.float32)))

        got = self.attention(q, k, v, bias, **kwargs)
        want = chunkattn.reference_attention(q, k, v, bias, **kwargs)
        assert testing.relative_error(got, want) <= testing.tolerance(q.dtype)
        if grads:
            g = jax.grad(lambda *a: loss(self.attention, *a), argnums=(0, 1, 2))(q, k, v)
            w = jax.grad(lambda *a: loss(chunkattn.reference_attention, *a), argnums=(0, 1, 2))(
                q, k, v
            )
            for a, b in zip(g, w, strict=True):
                assert testing.relative_error(a, b) <= testing.tolerance(q.dtype, grad=True)


def test_padded_segment_ids_keep_the_chunk_ranges_tight():
    """Ten documents of 100 tokens in chunks of 64 (T = 1000 pads to 1024): the last query
    chunk sees only the last document's key chunks, and the first key chunk only the first
    document's query chunks, as they would without padding."""
    seg = masks.pad_segment_ids(jnp.asarray(np.repeat(np.arange(10), 100)[None]), 1024)
    marr = masks.MaskArrays(jnp.zeros(1, jnp.int32), q_segment_ids=seg, kv_segment_ids=seg)
    spec = masks.MaskSpec()
    lo, hi = masks.kv_chunk_range(spec, marr, 960, 64, 64, 16)
    assert (int(lo), int(hi)) == (14, 16)  # keys 896… hold document 9 (from 900)
    lo, hi = masks.q_chunk_range(spec, marr, 0, 64, 64, 16)
    assert (int(lo), int(hi)) == (0, 2)  # document 0 is rows 0–99
