"""The attention layer's KV cache and the GPT: decoding equals the full causal pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chunkattn.decode import DecodeConfig
from chunkattn.models.gpt import GPT, GPTConfig, generate
from chunkattn.nn.layers import KVCache, MultiHeadAttention


@pytest.mark.parametrize("rope", [True, False])
def test_token_by_token_and_prefill_decode_equal_the_full_pass(rope):
    layer = MultiHeadAttention(32, 4, num_kv_heads=2, rope=rope, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 32))
    full = layer(x)
    cache = KVCache.empty(2, 16, 2, 8)
    steps = []
    for t in range(11):
        y, cache = layer(x[:, t : t + 1], cache=cache)
        steps.append(y)
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-5)
    cache = KVCache.empty(2, 16, 2, 8)
    y0, cache = layer(x[:, :7], cache=cache)  # multi-token prefill
    y1, cache = layer(x[:, 7:9], cache=cache)  # two more
    y2, cache = layer(x[:, 9:], cache=cache)
    np.testing.assert_allclose(np.concatenate([y0, y1, y2], 1), np.asarray(full), atol=1e-5)
    assert int(cache.length) == 11


@pytest.mark.parametrize("window", [None, (5, 0)])
def test_long_prefill_then_decode_steps_with_a_window(window, monkeypatch):
    """A prefill longer than DECODE_MAX_QUERIES goes through dot_product_attention, the steps
    after it through decode_attention (split over the cache); both equal the full pass."""
    from chunkattn import decode
    from chunkattn.nn import layers

    calls = []
    real = decode.decode_attention
    monkeypatch.setattr(
        layers, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    layer = MultiHeadAttention(
        32,
        4,
        num_kv_heads=2,
        local_window_size=window,
        decode_config=DecodeConfig(chunk_size=4, num_splits=2),  # several waves
        rngs=nnx.Rngs(0),
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 23, 32))
    full = layer(x)
    cache = KVCache.empty(2, 40, 2, 8)
    y0, cache = layer(x[:, :20], cache=cache)  # 20 > DECODE_MAX_QUERIES: a prefill
    assert not calls
    steps = [y0]
    for t in range(20, 23):
        y, cache = layer(x[:, t : t + 1], cache=cache)
        steps.append(y)
    assert len(calls) == 3
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-5)


def test_gpt_xla_and_chunked_agree_and_cache_decoding_matches():
    base = dict(max_seq_len=32, num_layers=2, num_heads=4, num_kv_heads=2, dim=32)
    chunked = GPT(GPTConfig(**base, attention="chunked"), rngs=nnx.Rngs(0))
    xla = GPT(GPTConfig(**base, attention="xla"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 20), 0, 256)
    a, b = chunked(tokens), xla(tokens)
    assert a.shape == (2, 20, 256)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
    logits, caches = chunked(tokens[:, :12], chunked.empty_caches(2, 32))
    nxt, caches = chunked(tokens[:, 12:13], caches)
    np.testing.assert_allclose(np.asarray(nxt[:, 0]), np.asarray(a[:, 12]), atol=2e-4)
    out = generate(chunked, tokens[:, :5], 6, rng=jax.random.PRNGKey(0), temperature=0.0)
    assert out.shape == (2, 11)
    # greedy decoding with the cache equals argmax of the full pass, token by token: by
    # causality the logits at position t − 1 of one pass over out[:, :10] are those of
    # out[:, :t]'s last position (one pass instead of one per length)
    want = jnp.argmax(chunked(out[:, :10])[:, 4:10], -1)  # (B, 6): the tokens 5..10
    np.testing.assert_array_equal(np.asarray(out[:, 5:11]), np.asarray(want))


def test_gpt_pallas_tpu_with_sinks_matches_chunked(monkeypatch):
    """attention="pallas_tpu" reaches our TPU kernels (here in the Pallas interpreter), sinks
    included, and gives the chunked model's logits."""
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    base = dict(max_seq_len=16, num_layers=1, num_heads=2, dim=32, sinks=True)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 16), 0, 256)
    want = GPT(GPTConfig(**base, attention="chunked"), rngs=nnx.Rngs(0))(tokens)
    got = GPT(GPTConfig(**base, attention="pallas_tpu"), rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


def test_config_is_validated():
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="dim"):
        GPTConfig(dim=30, num_heads=4)
    model = GPT(GPTConfig(max_seq_len=8, num_layers=1, dim=16, num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_linen_layer_decodes_like_its_full_pass():
    from chunkattn.nn.layers import LinenMultiHeadAttention

    layer = LinenMultiHeadAttention(dim=32, num_heads=4, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 32))
    params = layer.init(jax.random.PRNGKey(0), x)
    full = layer.apply(params, x)
    cache = KVCache.empty(2, 12, 2, 8)
    y0, cache = layer.apply(params, x[:, :5], cache=cache)
    ys = [y0]
    for t in range(5, 9):
        y, cache = layer.apply(params, x[:, t : t + 1], cache=cache)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, 1), np.asarray(full), atol=1e-5)


def test_cache_write_past_the_end_raises():
    """A full cache written again used to overwrite its last slot silently."""
    layer = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 16))
    cache = KVCache.empty(1, 4, 2, 8)
    _, cache = layer(x[:, :4], cache=cache)  # full
    with pytest.raises(ValueError, match=r"cache.length=4 must lie in \[0, 3\]"):
        layer(x[:, 4:5], cache=cache)
    with pytest.raises(ValueError, match=r"cache.length=3 must lie in \[0, 2\]"):
        layer(x[:, :2], cache=cache._replace(length=3))
    with pytest.raises(ValueError, match=r"cache.length=-1"):
        layer(x[:, :1], cache=cache._replace(length=-1))
    with pytest.raises(ValueError, match=r"x.shape\[1\]=5 new tokens do not fit"):
        layer(x, cache=KVCache.empty(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"cache.key.shape=\(1, 4, 2, 4\)"):
        layer(x[:, :1], cache=KVCache.empty(1, 4, 2, 4))


def test_cache_write_past_the_end_under_jit_is_reported_by_checkify():
    """Traced lengths: checkify names the overflow; unchecked, NaN out and the cache intact."""
    from jax.experimental import checkify

    layer = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    step = lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 16))
    _, full = layer(x[:, :4], cache=KVCache.empty(1, 4, 2, 8))
    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
    err, _ = checked(state, x[:, 4:5], full)
    with pytest.raises(checkify.JaxRuntimeError, match=r"cache.length=4 must lie in \[0, 3\]"):
        err.throw()
    err, _ = checked(state, x[:, 3:4], full._replace(length=jnp.asarray(3)))
    assert err.get() is None
    y, after = jax.jit(step)(state, x[:, 4:5], full)
    assert np.isnan(np.asarray(y)).all()
    np.testing.assert_array_equal(after.key, full.key)
    np.testing.assert_array_equal(after.value, full.value)


def test_rope_needs_an_even_head_dim():
    """An odd head dim used to rotate mismatched halves (wrong features, or a shape error)."""
    from chunkattn.nn.layers import rotary

    for head_dim in (3, 5):
        x = jnp.ones((1, 4, 2, head_dim))
        with pytest.raises(ValueError, match=rf"even head dim.*x.shape=\(1, 4, 2, {head_dim}\)"):
            rotary(x, jnp.arange(4))
    with pytest.raises(ValueError, match=r"head_dim=5 \(dim=20 / num_heads=4\)"):
        MultiHeadAttention(20, 4, rope=True, rngs=nnx.Rngs(0))
    layer = MultiHeadAttention(20, 4, rope=False, rngs=nnx.Rngs(0))  # no rotation: fine
    assert layer(jnp.ones((1, 3, 20))).shape == (1, 3, 20)


def test_layers_decode_under_x64():
    """x64: float64 weights and an int64 cache length decode like the full pass, under jit."""
    with jax.enable_x64(True):
        layer = MultiHeadAttention(
            16, 2, num_kv_heads=1, dtype=jnp.float64, implementation="chunked", rngs=nnx.Rngs(0)
        )
        x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 16), jnp.float64)
        full = layer(x)
        graphdef, state = nnx.split(layer)
        step = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache))
        cache = KVCache.empty(1, 8, 1, 8, jnp.float64)._replace(length=jnp.zeros((), jnp.int64))
        y0, cache = step(state, x[:, :4], cache)  # prefill
        ys = [y0]
        for t in range(4, 6):
            y, cache = step(state, x[:, t : t + 1], cache)
            ys.append(y)
        assert ys[-1].dtype == jnp.float64
        np.testing.assert_allclose(np.concatenate(ys, 1), np.asarray(full), atol=1e-10)


def test_gpt_with_sinks_trains():
    """GPTConfig(sinks=True): every layer owns `sinks` [N], they get gradients and change, and
    the loss falls (the layers' decoding with sinks: tests/test_nn.py)."""
    import optax

    cfg = GPTConfig(max_seq_len=16, num_layers=2, num_heads=4, num_kv_heads=2, dim=32, sinks=True)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert [b.attn.sinks[...].shape for b in model.blocks] == [(4,), (4,)]
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 16), 0, 256)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])  # (B, T, V)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state, losses = tx.init(params), []
    for _ in range(4):
        params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
        for block in grads["blocks"].values():
            assert (np.abs(np.asarray(block["attn"]["sinks"][...])) > 0).all()
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    trained = nnx.merge(graphdef, params, rest)
    assert all((np.asarray(b.attn.sinks[...]) != 0).all() for b in trained.blocks)


@pytest.mark.parametrize("attention", ["cudnn", "linear", "delta", "caterpillar"])
def test_sinks_need_a_chunkattn_softmax(attention):
    with pytest.raises(ValueError, match=f"GPTConfig.sinks needs .*attention='{attention}'"):
        GPTConfig(attention=attention, sinks=True)
