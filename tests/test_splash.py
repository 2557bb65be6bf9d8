"""Splash attention (JAX's fused TPU kernel) behind `implementation="splash"`, checked on CPU.

The shared suite runs splash in the Pallas TPU interpreter (CHUNKATTN_PALLAS_INTERPRET=1)
against the float32 reference, forward, lse and gradients; requests splash does not serve
(dense bias/mask, dropout, score_fn/mask_fn, float16, a per-batch q_offset) are declined with
NotImplementedError naming the feature and skipped. Each served feature is also lowered for a
TPU with `jax.export(platforms=["tpu"])` on this host. The deviceless compile for real TPU
targets (libtpu) is in tests/test_tpu_aot.py (marker tpu_aot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_suite import AttentionSuite

import chunkattn
from chunkattn import splash, testing

B, N, K, H = 2, 4, 2, 16


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")


class TestSplashInterpret(AttentionSuite):
    implementation = "splash"
    config = None  # splash's own blocks, clipped to the padded lengths
    may_decline = True
    mask_shapes = ((19, 41),)
    # Interpreting is slow; these add nothing splash-specific at interpreter speed.
    test_long_unequal = test_vmap = test_no_retrace = test_large_logits_f16 = None
    # Sinks start each row; one kind per splash mechanism (the band, the segment ids).
    sink_kinds = ("causal_offset", "segment_pair")
    # Every length pads to 128-wide blocks: one block, a long key side, a long query side.
    length_pairs = ((33, 100), (1, 257), (257, 17))

    def test_debug_infs_and_nans_are_clean_on_valid_input(self):
        pytest.skip("the TPU interpreter runs each kernel body as its own program")


def _qkv(T=300, S=300, dtype=jnp.float32, num_kv_heads=K, head_dim=H):
    return testing.random_qkv(
        jax.random.PRNGKey(T + S),
        seq_q=T,
        seq_k=S,
        num_heads=N,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )


def _splash(*args, **kwargs):
    return chunkattn.dot_product_attention(*args, implementation="splash", **kwargs)


@pytest.mark.parametrize(
    "is_causal,window,offset,seq_q,seq_k",
    [
        (True, None, 0, 300, 300),
        (False, (5, 0), 3, 19, 41),
        (True, (2**31 - 1, 3), 2**31 - 300, 300, 300),  # no limit, an offset near int32's top
        (False, (2, 2**31 - 1), -(2**31), 20, 30),  # every row empty
        (False, (20, 20), -300, 300, 300),  # a whole block of rows empty
        (True, (0, 7), -5, 40, 9),
    ],
)
def test_band_is_the_mask_without_wrapping(is_causal, window, offset, seq_q, seq_k):
    lo, hi = splash.band(is_causal, window, offset, seq_q, seq_k)
    for bound in (lo, hi):
        assert bound is None or abs(bound) <= seq_q + seq_k + 1, "splash adds it to int32 positions"
    i = np.arange(seq_q, dtype=object)[:, None]  # exact integers
    j = np.arange(seq_k, dtype=object)[None, :]
    want = np.ones((seq_q, seq_k), bool)
    if is_causal:
        want &= j <= i + offset
    if window is not None:
        want &= (j >= i + offset - window[0]) & (j <= i + offset + window[1])
    got = np.ones((seq_q, seq_k), bool)
    if lo is not None:
        got &= j >= i - lo
    if hi is not None:
        got &= j <= i + hi
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("sinks", [None, jnp.array([1.0, -2.0, 0.0, 3.0])])
def test_rows_splash_never_visits(sinks):
    """A block of 128 rows that sees no key is skipped by splash: output 0, lse −inf (or the
    sink), finite gradients, and the rows that see keys match the reference."""
    q, k, v = _qkv()
    kw = dict(local_window_size=(20, 20), q_offset=-200, sinks=sinks)  # rows < 180 see nothing
    out, lse = _splash(q, k, v, return_lse=True, **kw)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[:, :180] == 0)
    want = -np.inf if sinks is None else np.asarray(sinks)[None, :, None]
    np.testing.assert_array_equal(lse[:, :, :180], np.broadcast_to(want, lse[:, :, :180].shape))
    testing.assert_matches_reference(_splash, q, k, v, **kw)


def test_per_batch_lengths_and_segments_together():
    q, k, v = _qkv(T=150, S=270, dtype=jnp.bfloat16, num_kv_heads=1, head_dim=32)
    rng = np.random.default_rng(0)
    seg_q = np.sort(rng.integers(-3, 3, (B, 150)), 1).astype(np.int32)
    seg_k = np.sort(rng.integers(-3, 3, (B, 270)), 1).astype(np.int32)
    testing.assert_matches_reference(
        _splash,
        q,
        k,
        v,
        is_causal=True,
        q_offset=120,
        segment_ids=(jnp.asarray(seg_q), jnp.asarray(seg_k)),
        query_seq_lengths=jnp.array([150, 77]),
        key_value_seq_lengths=jnp.array([200, 270]),
    )


@pytest.mark.parametrize(
    "kwargs,feature",
    [
        ({"bias": jnp.zeros((1, N, 1, 41))}, "a dense bias"),
        ({"mask": jnp.ones((19, 41), bool)}, "a dense mask"),
        ({"dropout_rate": 0.1, "dropout_rng": jax.random.PRNGKey(0)}, "dropout"),
        ({"score_fn": lambda s, b, h, i, j: s}, "score_fn"),
        ({"mask_fn": lambda b, h, i, j: j <= i}, "mask_fn"),
        ({"is_causal": True, "q_offset": jnp.array([0, 3])}, "per-batch q_offset"),
        ({"dtype": jnp.float16}, "float16"),
    ],
)
def test_declines_name_the_feature(kwargs, feature):
    q, k, v = _qkv(T=19, S=41, dtype=kwargs.pop("dtype", jnp.float32))
    with pytest.raises(NotImplementedError, match=feature):
        _splash(q, k, v, **kwargs)
    # implementation=None falls back to the chunked path, with the same answer.
    out = chunkattn.dot_product_attention(q, k, v, **kwargs)
    assert out.shape == q.shape


def test_traced_q_offset_is_declined():
    q, k, v = _qkv(T=19, S=41)
    with pytest.raises(NotImplementedError, match="traced q_offset"):
        jax.jit(lambda o: _splash(q, k, v, is_causal=True, q_offset=o))(3)


def test_config_is_validated():
    with pytest.raises(ValueError, match="block_q"):
        splash.SplashConfig(block_q=100)
    with pytest.raises(ValueError, match="block_kv_compute"):
        splash.SplashConfig(block_kv=256, block_kv_compute=384)
    q, k, v = _qkv(T=19, S=41)
    with pytest.raises(NotImplementedError, match="SplashConfig"):
        _splash(q, k, v, config=chunkattn.ChunkConfig())
    small = splash.SplashConfig(
        block_q=128, block_kv=128, block_kv_compute=128, fused_backward=False
    )
    testing.assert_matches_reference(
        lambda *a, **kw: _splash(*a, config=small, **kw), *_qkv(T=260, S=300), is_causal=True
    )


def _pallas_calls(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_auto_prefers_splash_on_tpu_for_what_it_serves_exactly(monkeypatch):
    """On a TPU backend implementation=None runs splash for bfloat16, and our own TPU kernel
    (chunkattn/tpu_flash.py) for float32 at HIGHEST precision (splash cannot promise it) and
    for what splash declines (dropout)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v = _qkv(T=19, S=41, dtype=jnp.bfloat16)
    auto = lambda q, k, v, **kw: chunkattn.dot_product_attention(q, k, v, is_causal=True, **kw)
    jaxpr = lambda fn, *args: str(jax.make_jaxpr(fn)(*args))
    assert _pallas_calls(auto, q, k, v) == 1 and "splash" in jaxpr(auto, q, k, v)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    text = jaxpr(auto, q32, k32, v32)
    assert "splash" not in text and "chunkattn_tpu_flash_fwd" in text
    dropout = dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0))
    text = jaxpr(lambda q, k, v: auto(q, k, v, **dropout), q, k, v)
    assert "splash" not in text and "chunkattn_tpu_flash_fwd" in text


FEATURES = {
    "causal_gqa": dict(is_causal=True),
    "window_offset": dict(local_window_size=(64, 0), q_offset=100),
    "segments_lengths": dict(
        segment_ids=jnp.asarray(np.repeat([[0, 1]], 150, axis=1).repeat(B, 0)[:, :300]),
        key_value_seq_lengths=jnp.array([300, 250]),
    ),
    "soft_cap_sinks": dict(logits_soft_cap=30.0, sinks=jnp.zeros((N,))),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_each_feature_exports_for_tpu(name, monkeypatch):
    """Forward and backward lower to Mosaic TPU custom calls on this CPU host (interpret off)."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "0")
    q, k, v = _qkv(dtype=jnp.bfloat16, head_dim=128)
    kw = FEATURES[name]

    def step(q, k, v):
        loss = lambda q, k, v: jnp.sum(_splash(q, k, v, **kw).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(q, k, v)
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") >= 2, "the forward and the fused backward kernel"
    assert "splash_mqa_fwd" in text and "splash_mqa_dkv" in text
