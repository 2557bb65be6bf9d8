"""decode_attention: a few queries against a KV cache, split over the cache, vs the oracle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkattn
from chunkattn import testing
from chunkattn.decode import DecodeConfig, decode_attention

B, L, N, K, H = 3, 1000, 4, 2, 32
LENGTHS = jnp.array([3, 517, 1000])  # nearly empty, partly filled, full


def _inputs(seq_q: int, dtype=jnp.float32):
    q, _, _ = testing.random_qkv(
        jax.random.PRNGKey(0), batch=B, seq_q=seq_q, num_heads=N, head_dim=H, dtype=dtype
    )
    _, k, v = testing.random_qkv(
        jax.random.PRNGKey(1),
        batch=B,
        seq_q=L,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        dtype=dtype,
    )
    return q, k, v


CONFIGS = [None, DecodeConfig(64, 3), DecodeConfig(7, 5), DecodeConfig(L, 1)]
MASKS = {
    "causal": dict(),
    "window": dict(local_window_size=(50, 0)),
    "full": dict(is_causal=False),
    "soft_cap": dict(logits_soft_cap=5.0),
}


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "64x3", "7x5", "one_chunk"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("seq_q", [1, 3])
def test_matches_reference(seq_q, mask, config):
    q, k, v = _inputs(seq_q)
    kwargs = MASKS[mask]
    out, lse = decode_attention(q, k, v, LENGTHS, config=config, return_lse=True, **kwargs)
    want, want_lse = chunkattn.reference_attention(
        q,
        k,
        v,
        q_offset=LENGTHS - seq_q,
        key_value_seq_lengths=LENGTHS,
        is_causal=kwargs.get("is_causal", True),
        local_window_size=kwargs.get("local_window_size"),
        logits_soft_cap=kwargs.get("logits_soft_cap"),
        return_lse=True,
    )
    chex.assert_shape(out, (B, seq_q, N, H))
    tol = testing.tolerance(q.dtype)
    assert testing.relative_error(out, want) <= tol
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("config", [None, DecodeConfig(64, 3)], ids=["default", "64x3"])
def test_sinks_match_reference(config):
    q, k, v = _inputs(2)
    sinks = jnp.array([0.0, 3.0, -2.0, 1.0])
    lengths = jnp.array([0, 517, 1000])  # an empty cache: its rows attend only to the sink
    out, lse = decode_attention(q, k, v, lengths, sinks=sinks, config=config, return_lse=True)
    want, want_lse = chunkattn.reference_attention(
        q,
        k,
        v,
        q_offset=lengths - 2,
        key_value_seq_lengths=lengths,
        is_causal=True,
        sinks=sinks,
        return_lse=True,
    )
    assert testing.relative_error(out, want) <= testing.tolerance(q.dtype)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    assert np.all(np.asarray(out[0]) == 0)
    np.testing.assert_allclose(lse[0], np.broadcast_to(np.asarray(sinks)[:, None], (N, 2)))


def test_mla_absorbed_shapes():
    """MLA decoding with absorbed projections: q/k head dim 576, v 512, one kv head."""
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(3),
        batch=2,
        seq_q=1,
        seq_k=300,
        num_heads=8,
        num_kv_heads=1,
        head_dim=576,
        head_dim_v=512,
        dtype=jnp.bfloat16,
    )
    lengths = jnp.array([300, 41])
    out = decode_attention(q, k, v, lengths, scale=192**-0.5, config=DecodeConfig(64, 2))
    want = chunkattn.reference_attention(
        q,
        k,
        v,
        scale=192**-0.5,
        q_offset=lengths - 1,
        key_value_seq_lengths=lengths,
        is_causal=True,
    )
    chex.assert_shape(out, (2, 1, 8, 512))
    assert testing.relative_error(out, want) <= testing.tolerance(q.dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    q, k, v = _inputs(1, dtype)
    out = decode_attention(q, k, v, LENGTHS, config=DecodeConfig(64, 3))
    assert out.dtype == dtype
    want = chunkattn.reference_attention(
        q, k, v, q_offset=LENGTHS - 1, key_value_seq_lengths=LENGTHS, is_causal=True
    )
    assert testing.relative_error(out, want) <= testing.tolerance(dtype)


def test_reads_no_wave_past_the_filled_length():
    """Keys and values past the last wave the lengths reach are NaN: nothing of them leaks."""
    q, k, v = _inputs(1)
    cfg = DecodeConfig(chunk_size=16, num_splits=2)  # waves of 32 keys
    lengths = jnp.array([40, 5, 64])  # the waves end at key 64
    poison = jnp.arange(L)[None, :, None, None] >= 64
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    out = decode_attention(q, k_bad, v_bad, lengths, config=cfg)
    want = chunkattn.reference_attention(
        q, k, v, q_offset=lengths - 1, key_value_seq_lengths=lengths, is_causal=True
    )
    assert testing.relative_error(out, want) <= testing.tolerance(q.dtype)


def test_explicit_q_offset_and_rows_that_see_nothing():
    q, k, v = _inputs(2)
    # Window (0, 0) at position 0 of an empty cache row: that query sees no key at all.
    lengths = jnp.array([0, 10, 1000])
    offset = jnp.array([0, 3, 998])
    out, lse = decode_attention(
        q, k, v, lengths, q_offset=offset, local_window_size=(4, 0), return_lse=True
    )
    want = chunkattn.reference_attention(
        q,
        k,
        v,
        q_offset=offset,
        key_value_seq_lengths=lengths,
        local_window_size=(4, 0),
        is_causal=True,
    )
    assert not jnp.any(jnp.isnan(out))
    np.testing.assert_array_equal(out[0], 0.0)
    assert jnp.all(jnp.isneginf(lse[0]))
    assert testing.relative_error(out, want) <= testing.tolerance(q.dtype)


def test_one_compilation_for_every_length():
    q, k, v = _inputs(1)
    step = jax.jit(chex.assert_max_traces(lambda q, k, v, n: decode_attention(q, k, v, n), n=1))
    for n in (1, 300, 1000):
        step(q, k, v, jnp.full((B,), n, jnp.int32))


def test_gradients_are_refused_with_the_reason():
    q, k, v = _inputs(1)
    with pytest.raises(NotImplementedError, match="gradients of decode_attention"):
        jax.grad(lambda q: jnp.sum(decode_attention(q, k, v, LENGTHS)))(q)


def test_bad_arguments():
    q, k, v = _inputs(1)
    with pytest.raises(ValueError, match=r"cache_lengths.shape=\(2,\)"):
        decode_attention(q, k, v, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="cache_lengths"):
        decode_attention(q, k, v, 3.0)
    with pytest.raises(ValueError, match="query must be"):
        decode_attention(q[0], k, v, 3)
    out = decode_attention(q.tolist(), k.tolist(), v.tolist(), 3)  # array-likes, as jax.nn
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="key.shape"):
        decode_attention(q, k[:, :, :, :16], v, 3)
    with pytest.raises(ValueError, match="DecodeConfig.num_splits"):
        DecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="config must be a DecodeConfig"):
        decode_attention(q, k, v, 3, config=chunkattn.ChunkConfig())


def test_default_splits_per_backend():
    """GPU: as many chunks per wave as the score and key budgets allow; CPU: one (the loop)."""
    assert DecodeConfig().resolve(64, 100_000, backend="cpu") == (512, 1)
    assert DecodeConfig().resolve(64, 100_000, backend="gpu") == (512, 32)  # ≤ 16384 keys/wave
    # a budget below two chunks: one
    assert DecodeConfig().resolve(64 * 1024, 100_000, backend="gpu") == (512, 1)
    assert DecodeConfig(chunk_size=64, num_splits=1000).resolve(8, 300) == (64, 4)  # ≤ the cache


def test_float32_products_run_at_highest_precision():
    """As dot_product_attention: float32 inputs never run as TF32 on a GPU."""
    q, k, v = _inputs(1)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: decode_attention(q, k, v, LENGTHS))(q, k, v))
    assert jaxpr.count("dot_general[") == jaxpr.count("precision=(Precision.HIGHEST") > 0


def test_cache_lengths_outside_the_cache_raise():
    """Negative lengths, or more than the cache holds, are refused (they were read silently)."""
    q, k, v = _inputs(1)
    for bad in (-1, L + 1, jnp.array([3, L + 1, 5]), jnp.array([0, -2, L])):
        with pytest.raises(ValueError, match=rf"cache_lengths=.* must lie in \[0, L={L}\]"):
            decode_attention(q, k, v, bad)
    with jax.enable_x64(True):  # a length that an int32 cast would wrap into range
        with pytest.raises(ValueError, match="cache_lengths=4294967299"):
            decode_attention(q, k, v, jnp.array(2**32 + 3, jnp.int64))


def test_traced_cache_lengths_are_checked_by_checkify_and_never_silent():
    """Under jit: checkify reports a bad length; unchecked, that batch entry is NaN."""
    from jax.experimental import checkify

    q, k, v = _inputs(1)
    step = lambda n: decode_attention(q, k, v, n, config=DecodeConfig(256, 1))
    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
    err, _ = checked(jnp.array([3, L + 7, 5]))
    with pytest.raises(checkify.JaxRuntimeError, match=rf"cache_lengths=\[ *3 +{L + 7} +5\]"):
        err.throw()
    err, out = checked(LENGTHS)
    assert err.get() is None
    out = jax.jit(step)(jnp.array([3, -1, 1000]))
    assert np.isnan(np.asarray(out[1])).all()
    want = decode_attention(q, k, v, jnp.array([3, 1, 1000]))
    np.testing.assert_allclose(out[::2], want[::2], atol=1e-6)  # other entries unharmed
