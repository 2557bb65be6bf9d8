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


def _sown(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("mask_name", ["none", "causal_b1tt"])
def test_linen_sows_the_weights_flax_sows(mask_name):
    """sow_weights=True used to raise NotImplementedError; now dense weights, sown as Flax does,
    and the output is still chunkattn's (the same as without sowing)."""
    mask = _masks()[mask_name]
    kw = dict(num_heads=HEADS, qkv_features=D, deterministic=True)
    ref = lnn.MultiHeadDotProductAttention(**kw)
    ours = lnn.MultiHeadDotProductAttention(**kw, attention_fn=chunkattn.nn.attention_fn)
    x = _x(2)
    params = ref.init(jax.random.PRNGKey(0), x)
    sow = dict(mask=mask, sow_weights=True, mutable=["intermediates"])
    y_ref, s_ref = ref.apply(params, x, **sow)
    y_ours, s_ours = ours.apply(params, x, **sow)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_ours, s_ref)
    chex.assert_trees_all_close(_sown(s_ours), _sown(s_ref), atol=1e-6)
    np.testing.assert_array_equal(y_ours, ours.apply(params, x, mask=mask))
    np.testing.assert_allclose(y_ours, y_ref, atol=2e-5)


def test_nnx_sows_the_weights_flax_sows():
    make = lambda fn: nnx.MultiHeadAttention(
        num_heads=HEADS,
        num_kv_heads=2,  # grouped-query heads: weights per query head, as Flax's
        in_features=D,
        qkv_features=D,
        decode=False,
        rngs=nnx.Rngs(0),
        **({} if fn is None else {"attention_fn": fn}),
    )
    ref, ours = make(None), make(chunkattn.nn.make_attention_fn(local_window_size=(T, 0)))
    x = _x(4)
    y_ref = ref(x, is_causal=True, sow_weights=True)
    y_ours = ours(x, is_causal=True, sow_weights=True)
    s_ref, s_ours = nnx.state(ref, nnx.Intermediate), nnx.state(ours, nnx.Intermediate)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_ours, s_ref)
    chex.assert_trees_all_close(_sown(s_ours), _sown(s_ref), atol=1e-6)
    np.testing.assert_allclose(y_ours, y_ref, atol=2e-5)
    q = k = v = _x().reshape(B, T, HEADS, D // HEADS)
    with pytest.raises(ValueError, match="module of type object"):
        chunkattn.nn.attention_fn(q, k, v, module=object())


def _complex(x):
    return (x + 1j * jax.random.normal(jax.random.PRNGKey(9), x.shape)).astype(jnp.complex64)


def test_complex_inputs_are_served_as_flax_serves_them():
    """Complex inputs used to be rejected; they get exactly Flax's numbers, linen's and nnx's
    (which differ: nnx keeps only the real part of the scores)."""
    x = _complex(_x(6))
    mask = _masks()["causal_and_padding"]
    kw = dict(num_heads=HEADS, qkv_features=D, dtype=jnp.complex64, param_dtype=jnp.complex64)
    ref = lnn.MultiHeadDotProductAttention(**kw)
    ours = lnn.MultiHeadDotProductAttention(**kw, attention_fn=chunkattn.nn.attention_fn)
    params = ref.init(jax.random.PRNGKey(0), x)
    want = ref.apply(params, x, mask=mask)
    assert want.dtype == jnp.complex64
    np.testing.assert_allclose(ours.apply(params, x, mask=mask), want, rtol=1e-6, atol=1e-6)
    causal = lnn.MultiHeadDotProductAttention(
        **kw, attention_fn=chunkattn.nn.make_attention_fn(is_causal=True)
    )
    np.testing.assert_allclose(
        causal.apply(params, x), ref.apply(params, x, mask=_masks()["causal_b1tt"]), atol=1e-6
    )
    make = lambda fn: nnx.MultiHeadAttention(
        num_heads=HEADS,
        in_features=D,
        qkv_features=D,
        decode=False,
        dtype=jnp.complex64,
        param_dtype=jnp.complex64,
        rngs=nnx.Rngs(0),
        **({} if fn is None else {"attention_fn": fn}),
    )
    ref_nnx, ours_nnx = make(None), make(chunkattn.nn.attention_fn)
    for is_causal in (False, True):
        want = ref_nnx(x, is_causal=is_causal)
        np.testing.assert_allclose(ours_nnx(x, is_causal=is_causal), want, rtol=1e-6, atol=1e-6)
    q = x.reshape(B, T, HEADS, D // HEADS)
    with pytest.raises(NotImplementedError, match=r"complex inputs with .*\['local_window_size'\]"):
        chunkattn.nn.make_attention_fn(local_window_size=2)(q, q, q)


def test_make_attention_fn_is_causal_with_an_nnx_module_that_passes_is_causal():
    """README's make_attention_fn(is_causal=True) in an nnx module, which passes is_causal
    itself: the two combine with OR."""
    make = lambda fn: nnx.MultiHeadAttention(
        num_heads=HEADS,
        in_features=D,
        qkv_features=D,
        decode=False,
        rngs=nnx.Rngs(0),
        **({} if fn is None else {"attention_fn": fn}),
    )
    ref = make(None)
    baked = make(chunkattn.nn.make_attention_fn(is_causal=True))
    plain = make(chunkattn.nn.make_attention_fn())
    x = _x(8)
    causal = ref(x, is_causal=True)
    np.testing.assert_allclose(baked(x, is_causal=True), causal, atol=2e-5)
    np.testing.assert_allclose(baked(x, is_causal=False), causal, atol=2e-5)
    np.testing.assert_allclose(plain(x, is_causal=True), causal, atol=2e-5)
    with pytest.raises(ValueError, match="is_causal must be a bool"):
        chunkattn.nn.make_attention_fn(is_causal="yes")


def test_flax_modules_decode_under_x64():
    """Flax's own decode=True caches (int32 index, dense [B, 1, 1, L] mask) under x64,
    token by token, equal Flax's default attention."""
    with jax.enable_x64(True):
        x = _x(10)[:1, :5].astype(jnp.float32)
        make = lambda fn: nnx.MultiHeadAttention(
            num_heads=HEADS,
            in_features=D,
            qkv_features=D,
            decode=True,
            rngs=nnx.Rngs(0),
            **({} if fn is None else {"attention_fn": fn}),
        )
        ref, ours = make(None), make(chunkattn.nn.attention_fn)
        for m in (ref, ours):
            m.init_cache(x.shape)
        for t in range(x.shape[1]):
            np.testing.assert_allclose(ours(x[:, t : t + 1]), ref(x[:, t : t + 1]), atol=2e-5)
        kw = dict(num_heads=HEADS, qkv_features=D, decode=True)
        ref_l = lnn.MultiHeadDotProductAttention(**kw)
        ours_l = lnn.MultiHeadDotProductAttention(**kw, attention_fn=chunkattn.nn.attention_fn)
        variables = ref_l.init(jax.random.PRNGKey(0), x)
        caches = [variables["cache"]] * 2
        for t in range(x.shape[1]):
            ys = []
            for i, m in enumerate((ref_l, ours_l)):
                y, new = m.apply(
                    {"params": variables["params"], "cache": caches[i]},
                    x[:, t : t + 1],
                    mutable=["cache"],
                )
                caches[i] = new["cache"]
                ys.append(y)
            np.testing.assert_allclose(ys[1], ys[0], atol=2e-5)


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
