"""chunkattn.nn.attention_fn is an exact drop-in for Flax's default attention (linen and nnx)."""

from __future__ import annotations

import chex
import flax.linen as lnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import chunkattn
import chunkattn.nn
from chunkattn import testing

B, T, D, HEADS = 2, 13, 32, 4


def _x(seed=0, batch=(B,)):
    return jax.random.normal(jax.random.PRNGKey(seed), (*batch, T, D))


def _masks():
    causal = lnn.make_causal_mask(jnp.ones((B, T)))  # (B, 1, T, T)
    tokens = jnp.arange(T)[None, :] < jnp.array([[T], [9]])  # padding after 9 in batch 1
    padding = lnn.make_attention_mask(tokens, tokens)  # (B, 1, T, T)
    return {
        "none": None,
        "causal_b1tt": causal,
        "causal_and_padding": lnn.combine_masks(causal, padding),
        "heads_bntt": jax.random.bernoulli(jax.random.PRNGKey(1), 0.7, (B, HEADS, T, T))
        | jnp.eye(T, dtype=bool),
        "tt_only": jnp.tril(jnp.ones((T, T), bool)),
    }


def _rows_with_keys(mask):
    if mask is None:
        return np.ones((B, T), bool)
    m = np.broadcast_to(np.asarray(mask), (B, HEADS, T, T))
    return m.any(-1).all(1)  # (B, T): rows where every head sees a key


@pytest.mark.parametrize("mask_name", list(_masks()))
def test_linen_outputs_and_param_grads_match_flax(mask_name):
    mask = _masks()[mask_name]
    kw = dict(num_heads=HEADS, qkv_features=D, dropout_rate=0.0, deterministic=True)
    ref = lnn.MultiHeadDotProductAttention(**kw)
    ours = lnn.MultiHeadDotProductAttention(**kw, attention_fn=chunkattn.nn.attention_fn)
    x = _x()
    params = ref.init(jax.random.PRNGKey(0), x, mask=mask)

    def loss(p, module):
        y = module.apply(p, x, mask=mask)
        return jnp.sum(jnp.where(_rows_with_keys(mask)[..., None], y, 0.0) ** 2), y

    (l_ref, y_ref), g_ref = jax.value_and_grad(lambda p: loss(p, ref), has_aux=True)(params)
    (l_ours, y_ours), g_ours = jax.value_and_grad(lambda p: loss(p, ours), has_aux=True)(params)
    rows = _rows_with_keys(mask)
    np.testing.assert_allclose(np.asarray(y_ours)[rows], np.asarray(y_ref)[rows], atol=2e-5)
    chex.assert_trees_all_close(g_ours, g_ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("mask_name", ["none", "causal_b1tt", "heads_bntt"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_nnx_outputs_and_param_grads_match_flax(mask_name, is_causal):
    mask = _masks()[mask_name]
    make = lambda fn: nnx.MultiHeadAttention(
        num_heads=HEADS,
        in_features=D,
        qkv_features=D,
        decode=False,
        rngs=nnx.Rngs(0),
        **({} if fn is None else {"attention_fn": fn}),
    )
    ref, ours = make(None), make(chunkattn.nn.attention_fn)
    x = _x(3)
    causal = np.tril(np.ones((T, T), bool)) if is_causal else np.ones((T, T), bool)
    full = np.broadcast_to(np.asarray(mask, bool) if mask is not None else True, (B, HEADS, T, T))
    rows = (full & causal).any(-1).all(1)

    def loss(model):
        y = model(x, mask=mask, is_causal=is_causal, deterministic=True)
        return jnp.sum(jnp.where(rows[..., None], y, 0.0) ** 2), y

    (_, y_ref), g_ref = nnx.value_and_grad(loss, has_aux=True)(ref)
    (_, y_ours), g_ours = nnx.value_and_grad(loss, has_aux=True)(ours)
    np.testing.assert_allclose(np.asarray(y_ours)[rows], np.asarray(y_ref)[rows], atol=2e-5)
    chex.assert_trees_all_close(nnx.state(g_ours), nnx.state(g_ref), atol=5e-5, rtol=5e-5)


def test_extra_batch_dims_dtype_and_precision():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 3, T, HEADS, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 3, T, HEADS, 8))
    v = jax.random.normal(jax.random.PRNGKey(2), (2, 3, T, HEADS, 8))
    mask = jnp.tril(jnp.ones((3, 1, T, T), bool))  # broadcast over the first batch dim
    got = chunkattn.nn.attention_fn(q, k, v, mask=mask, precision=jax.lax.Precision.HIGHEST)
    # Flax's own function needs the mask's batch dims spelled out (its reshape cannot broadcast).
    full_mask = jnp.broadcast_to(mask, (2, 3, 1, T, T))
    want = nnx.dot_product_attention(q, k, v, mask=full_mask, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    half = chunkattn.nn.attention_fn(q, k, v, mask=mask, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16 and half.shape == q.shape


def test_dropout_is_deterministic_per_key_and_off_when_deterministic():
    q = k = v = _x(5).reshape(B, T, HEADS, D // HEADS)
    kw = dict(dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
    a = chunkattn.nn.attention_fn(q, k, v, deterministic=False, **kw)
    b = chunkattn.nn.attention_fn(q, k, v, deterministic=False, **kw)
    c = chunkattn.nn.attention_fn(q, k, v, deterministic=True, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        np.asarray(c), np.asarray(chunkattn.nn.attention_fn(q, k, v)), atol=1e-6
    )
    assert not np.allclose(np.asarray(a), np.asarray(c))
    # and it is chunkattn's dropout, checked against the reference with the same mask
    want = chunkattn.reference_attention(q, k, v, **kw)
    assert testing.relative_error(a, want) < 1e-5


def test_sowing_weights_is_not_implemented():
    q = k = v = _x().reshape(B, T, HEADS, D // HEADS)
    with pytest.raises(NotImplementedError, match="sow"):
        chunkattn.nn.attention_fn(q, k, v, module=object())


def test_make_attention_fn_bakes_options_in():
    fn = chunkattn.nn.make_attention_fn(
        is_causal=True, local_window_size=(3, 0), config=chunkattn.ChunkConfig(4, 4)
    )
    q = k = v = _x(7).reshape(B, T, HEADS, D // HEADS)
    want = chunkattn.reference_attention(q, k, v, is_causal=True, local_window_size=(3, 0))
    assert testing.relative_error(fn(q, k, v), want) < 1e-5
    layer = lnn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, attention_fn=fn)
    params = layer.init(jax.random.PRNGKey(0), _x())
    assert layer.apply(params, _x()).shape == (B, T, D)
    with pytest.raises(ValueError, match="mask"):
        chunkattn.nn.make_attention_fn(mask=jnp.ones((T, T), bool))
