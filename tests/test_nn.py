"""chunkattn.nn.attention_fn is an exact drop-in for Flax's default attention (linen and nnx);
attention sinks through it and through the layers equal the dense softmax with a sink column."""

from __future__ import annotations

from typing import Any

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


# Attention sinks (gpt-oss): one logit per query head joins every row's softmax denominator.
HIGHEST = jax.lax.Precision.HIGHEST


def _weights_with_sinks(q, k, sinks, mask=None):
    """Dense [B, N, T, S]: the softmax of each row's scores with its head's sink appended as one
    more column, that column dropped (a sink carries no value). q [B, T, N, H], k [B, S, K, H]."""
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # (B, S, N, H): head n reads kv n // G
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision=HIGHEST) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    sink = jnp.broadcast_to(sinks[:, None, None], (*s.shape[:3], 1))  # (B, N, T, 1)
    return jax.nn.softmax(jnp.concatenate([s, sink], -1), -1)[..., :-1]


def _attention_with_sinks(q, k, v, sinks, mask=None):
    w = _weights_with_sinks(q, k, sinks, mask)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)  # (B, S, N, H)
    return jnp.einsum("bnts,bsnh->btnh", w, v, precision=HIGHEST)


class _SinkAttention(lnn.Module):
    """linen attention that owns a `sinks` parameter and hands it to `make(sinks)`, the
    attention_fn, on every call."""

    make: Any

    @lnn.compact
    def __call__(self, x, mask=None, sow_weights=False):
        sinks = self.param("sinks", lnn.initializers.normal(1.0), (HEADS,))
        mha = lnn.MultiHeadDotProductAttention(
            num_heads=HEADS, qkv_features=D, deterministic=True, attention_fn=self.make(sinks)
        )
        return mha(x, mask=mask, sow_weights=sow_weights)


def test_make_attention_fn_carries_learnable_sinks():
    """make_attention_fn(sinks=...) built from a module's parameter: the outputs and every
    parameter gradient (the sinks' included) of the dense softmax with a sink column."""
    mask = _masks()["causal_and_padding"]  # rows past the padding attend only to their sink
    dense = lambda s: (
        lambda q, k, v, bias=None, mask=None, **_: _attention_with_sinks(q, k, v, s, mask)
    )
    ref = _SinkAttention(dense)
    ours = _SinkAttention(lambda s: chunkattn.nn.make_attention_fn(sinks=s))
    x = _x(11)
    params = ref.init(jax.random.PRNGKey(0), x)
    w = jax.random.normal(jax.random.PRNGKey(12), (B, T, D))

    def loss(module):
        def f(p):
            y = module.apply(p, x, mask=mask)
            return jnp.sum(y * w), y

        return f

    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(loss(ref), has_aux=True))(params)
    (_, y_ours), g_ours = jax.jit(jax.value_and_grad(loss(ours), has_aux=True))(params)
    np.testing.assert_allclose(y_ours, y_ref, atol=2e-5)
    assert g_ours["params"]["sinks"].shape == (HEADS,)
    assert (np.abs(np.asarray(g_ours["params"]["sinks"])) > 1e-4).all(), g_ours["params"]["sinks"]
    chex.assert_trees_all_close(g_ours, g_ref, atol=5e-5, rtol=5e-5)
    # sown weights leave each row's sink share out: the dense weights of the keys
    sow = lambda p: ours.apply(p, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    y, sown = jax.jit(sow)(params)
    np.testing.assert_allclose(y, y_ours, atol=1e-6)
    p = params["params"]["MultiHeadDotProductAttention_0"]
    proj = lambda n: (
        jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"], precision=HIGHEST) + p[n]["bias"]
    )
    want = _weights_with_sinks(proj("query"), proj("key"), params["params"]["sinks"], mask)
    (got,) = jax.tree.leaves(sown)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(want.sum(-1).max()) < 1.0  # so the sinks took a share


def test_layers_with_sinks_match_the_dense_softmax_and_decode_like_the_full_pass():
    """use_sinks=True: a float32 zero-initialised parameter `sinks` [N] (nnx and linen); the nnx
    layer gives the dense softmax with a sink column and its exact gradient, and the linen layer
    with the same weights gives the same numbers through a long prefill (dot_product_attention)
    and decode steps (decode_attention)."""
    from chunkattn.nn import KVCache, LinenMultiHeadAttention, MultiHeadAttention, rotary

    seq, kv_heads, hd = 20, 2, D // HEADS
    layer = MultiHeadAttention(D, HEADS, kv_heads, use_sinks=True, rngs=nnx.Rngs(0))
    assert layer.sinks[...].dtype == jnp.float32
    np.testing.assert_array_equal(layer.sinks[...], np.zeros(HEADS))
    layer.sinks[...] = jnp.array([-2.0, 0.0, 1.0, 3.0])  # from "ignored" to "dominant"
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(13), (B, seq, D))
    w = jax.random.normal(jax.random.PRNGKey(14), (B, seq, D))

    def dense(state):
        m = nnx.merge(graphdef, state)
        pos = jnp.arange(seq)
        q = rotary(m.wq(x).reshape(B, seq, HEADS, hd), pos)  # (B, T, N, H)
        k = rotary(m.wk(x).reshape(B, seq, kv_heads, hd), pos)  # (B, T, K, H)
        v = m.wv(x).reshape(B, seq, kv_heads, hd)
        out = _attention_with_sinks(q, k, v, m.sinks[...], np.tril(np.ones((seq, seq), bool)))
        return m.wo(out.reshape(B, seq, D))  # (B, T, D)

    def output_and_grads(f):
        def loss(state):
            y = f(state)
            return jnp.sum(y * w), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return y, grads

    ours = lambda state: nnx.merge(graphdef, state)(x)
    (full, grads), (want, want_grads) = jax.jit(
        lambda: [output_and_grads(ours), output_and_grads(dense)]
    )()
    np.testing.assert_allclose(full, want, atol=2e-5)
    assert (np.abs(np.asarray(want_grads["sinks"][...])) > 1e-4).all(), want_grads["sinks"]
    chex.assert_trees_all_close(grads, want_grads, atol=5e-5, rtol=5e-5)

    linen_layer = LinenMultiHeadAttention(D, HEADS, kv_heads, use_sinks=True)
    init = linen_layer.lazy_init(jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x.shape, x.dtype))
    params = {n: {"kernel": state[n]["kernel"][...]} for n in ("wq", "wk", "wv", "wo")}
    params = {"params": {**params, "sinks": state["sinks"][...]}}
    chex.assert_trees_all_equal_shapes_and_dtypes(init, params)
    np.testing.assert_array_equal(init["params"]["sinks"], np.zeros(HEADS))
    step = jax.jit(lambda x, cache: linen_layer.apply(params, x, cache=cache))
    y, cache = step(x[:, :17], KVCache.empty(B, 24, kv_heads, hd))  # 17 > DECODE_MAX_QUERIES
    ys = [y]
    for t in range(17, seq):
        y, cache = step(x[:, t : t + 1], cache)  # decode_attention
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, 1), full, atol=1e-5)


def test_a_layer_with_a_mesh_hands_its_sinks_to_ring_attention(monkeypatch):
    """With a mesh the layer runs ring attention (which tests/test_parallel.py checks with sinks
    on 8 devices); here that the layer's sinks get there, through a stand-in that records them."""
    import chunkattn.parallel
    from chunkattn.nn import MultiHeadAttention

    seen = []

    def ring(q, k, v, *, mesh, axis_name, is_causal, sinks=None, **_):
        seen.append(sinks)
        return chunkattn.dot_product_attention(q, k, v, is_causal=is_causal, sinks=sinks)

    monkeypatch.setattr(chunkattn.parallel, "ring_attention", ring)
    mesh = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
    sinks = jnp.array([-2.0, 0.0, 1.0, 3.0])
    layers = [
        MultiHeadAttention(D, HEADS, 2, use_sinks=True, rngs=nnx.Rngs(0), **kw)
        for kw in ({}, {"mesh": mesh})
    ]
    for layer in layers:
        layer.sinks[...] = sinks
    x = _x(15)
    np.testing.assert_array_equal(layers[1](x), layers[0](x))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], sinks)


def test_sinks_follow_param_dtype():
    from chunkattn.nn import LinenMultiHeadAttention, MultiHeadAttention

    bf16 = jnp.bfloat16
    layer = MultiHeadAttention(D, HEADS, use_sinks=True, param_dtype=bf16, rngs=nnx.Rngs(0))
    assert layer.sinks[...].dtype == bf16 and layer.wq.kernel[...].dtype == bf16
    assert MultiHeadAttention(D, HEADS, rngs=nnx.Rngs(0)).sinks is None
    linen_layer = LinenMultiHeadAttention(dim=D, num_heads=HEADS, use_sinks=True, param_dtype=bf16)
    shapes = jax.eval_shape(linen_layer.init, jax.random.PRNGKey(0), _x())["params"]
    assert shapes["sinks"].shape == (HEADS,)
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(bf16)}
    plain = LinenMultiHeadAttention(dim=D, num_heads=HEADS)
    assert "sinks" not in jax.eval_shape(plain.init, jax.random.PRNGKey(0), _x())["params"]
