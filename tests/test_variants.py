"""Linear-time variants against their step-by-step recurrences, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn.variants import (
    caterpillar,
    delta_rule,
    delta_rule_reference,
    delta_rule_step,
    dpfp,
    linear_attention,
)


def linear_recurrence(q, k, v, phi, normalize):
    """y_t = S_t φ(q_t) / (z_t · φ(q_t)), S_t = S_{t−1} + v_t φ(k_t)ᵀ: one token at a time."""
    fq, fk = phi(q), phi(k)

    def step(carry, x):
        s, z = carry
        qt, kt, vt = x  # (B, N, H), (B, N, H), (B, N, Hv)
        s = s + jnp.einsum("bnh,bnv->bnhv", kt, vt)
        z = z + kt
        y = jnp.einsum("bnh,bnhv->bnv", qt, s)
        if normalize:
            y = y / jnp.einsum("bnh,bnh->bn", qt, z)[..., None]
        return (s, z), y

    b, t, n, h = q.shape
    init = (
        jnp.zeros((b, n, h if phi is not dpfp else 2 * h, v.shape[-1])),
        jnp.zeros((b, n, h if phi is not dpfp else 2 * h)),
    )
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (fq, fk, v))
    _, ys = jax.lax.scan(step, init, xs)
    return jnp.swapaxes(ys, 0, 1)


def _out_and_grads(fn, args, cotangent):
    """(fn(*args), the gradients of Σ fn(*args)·cotangent(out) with respect to args) in one
    compiled program: one compilation per case instead of eager dispatch of every operation."""

    def run(*a):
        out, vjp = jax.vjp(fn, *a)
        return out, vjp(cotangent(out))

    return jax.jit(run)(*args)


ELU1 = lambda x: jax.nn.elu(x) + 1.0


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("fmap,normalize", [("elu1", True), (None, False), ("dpfp", False)])
def test_linear_attention_equals_the_recurrence(chunk, fmap, normalize):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(chunk), 3)
    q = jax.random.normal(kq, (2, 23, 3, 8))
    k = jax.random.normal(kk, (2, 23, 3, 8))
    v = jax.random.normal(kv, (2, 23, 3, 6))
    phi = {"elu1": ELU1, None: lambda x: x, "dpfp": dpfp}[fmap]
    fm = dpfp if fmap == "dpfp" else fmap
    proj = lambda y: jax.random.normal(jax.random.PRNGKey(9), y.shape)  # d loss / dy
    got, g = _out_and_grads(
        lambda *a: linear_attention(*a, feature_map=fm, normalize=normalize, chunk_size=chunk),
        (q, k, v),
        proj,
    )
    want, w = _out_and_grads(lambda *a: linear_recurrence(*a, phi, normalize), (q, k, v), proj)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    for a, b in zip(g, w, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_dpfp_definition():
    x = jnp.array([[1.0, -2.0, 0.5]])
    r = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 0.0])
    f1 = r * np.roll(r, -1)
    f2 = np.concatenate([f1, r * np.roll(r, -2)])
    np.testing.assert_allclose(np.asarray(dpfp(x, 1))[0], f1 / (f1.sum() + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dpfp(x, 2))[0], f2 / (f2.sum() + 1e-6), rtol=1e-6)
    assert dpfp(jnp.ones((4, 5)), 3).shape == (4, 30)


def test_bad_input():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="k.shape"):
        linear_attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map="relu2")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, q, q, chunk_size=0)


def delta_recurrence(q, k, v, beta):
    """W_t = W_{t−1} + β_t (v_t − W_{t−1} k_t) k_tᵀ, y_t = W_t q_t, one token at a time."""

    def step(w, x):
        qt, kt, vt, bt = x  # (B, N, H), (B, N, H), (B, N, Hv), (B, N)
        err = vt - jnp.einsum("bnvh,bnh->bnv", w, kt)
        w = w + bt[..., None, None] * jnp.einsum("bnv,bnh->bnvh", err, kt)
        return w, jnp.einsum("bnvh,bnh->bnv", w, qt)

    b, t, n, h = q.shape
    w0 = jnp.zeros((b, n, v.shape[-1], h))
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta))
    _, ys = jax.lax.scan(step, w0, xs)
    return jnp.swapaxes(ys, 0, 1)


def _dqkvb(t, seed=0, n=2, h=4, hv=3):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (2, t, n, h))
    k = jax.random.normal(ks[1], (2, t, n, h))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (2, t, n, hv))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (2, t, n)))
    return q, k, v, beta


@pytest.mark.parametrize("chunk,t", [(1, 7), (4, 13), (16, 37), (64, 20)])
def test_delta_rule_matches_recurrence(chunk, t):
    args = _dqkvb(t)
    got, g1 = _out_and_grads(lambda *a: delta_rule(*a, chunk_size=chunk), args, jnp.cos)
    want, g2 = _out_and_grads(delta_recurrence, args, jnp.cos)  # the gradients of Σ sin(y)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_delta_rule_bf16_and_errors():
    q, k, v, beta = _dqkvb(19)
    got = delta_rule(*(x.astype(jnp.bfloat16) for x in (q, k, v, beta)), chunk_size=8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), delta_recurrence(q, k, v, beta), atol=0.1)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., 0])
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, beta, chunk_size=0)


def caterpillar_recurrence(q, k, v, gates, cl, init_k, init_v):
    """The definition with a Python loop over t (small T only)."""
    b, t, n, h = q.shape
    a = 1.0 - gates.sum(2)  # (B, T, CH)
    kt = jnp.einsum("btnr,btnh->btrh", gates, k)
    vt = jnp.einsum("btnr,btnh->btrh", gates, v)
    rk = [jnp.broadcast_to(init_k[:, i], (b,) + init_k[:, i].shape) for i in range(cl)]
    rv = [jnp.broadcast_to(init_v[:, i], (b,) + init_v[:, i].shape) for i in range(cl)]
    ys = []
    for s in range(t):
        rk.append(a[:, s, :, None] * rk[s] + kt[:, s])  # index cl+s holds position s
        rv.append(a[:, s, :, None] * rv[s] + vt[:, s])
        wk = jnp.stack(rk[s + 1 : s + 1 + cl], 1)  # (B, CL, CH, H)
        wv = jnp.stack(rv[s + 1 : s + 1 + cl], 1)
        sc = jnp.einsum("bnh,blrh->bnlr", q[:, s], wk) / np.sqrt(h)
        p = jax.nn.softmax(sc.reshape(b, n, -1), -1).reshape(sc.shape)
        ys.append(jnp.einsum("bnlr,blrv->bnv", p, wv))
    return jnp.stack(ys, 1)


@pytest.mark.parametrize("cl,t", [(1, 4), (3, 8)])
def test_caterpillar_matches_recurrence(cl, t):
    ks = jax.random.split(jax.random.PRNGKey(cl), 6)
    n, h, hv, ch = 2, 4, 3, 3
    q = jax.random.normal(ks[0], (2, t, n, h))
    k = jax.random.normal(ks[1], (2, t, n, h))
    v = jax.random.normal(ks[2], (2, t, n, hv))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (2, t, n, ch))) / n
    ik = jax.random.normal(ks[4], (ch, cl, h))
    iv = jax.random.normal(ks[5], (ch, cl, hv))
    args = (q, k, v, gates, ik, iv)
    fast = lambda q, k, v, g, ik, iv: caterpillar(q, k, v, g, length=cl, init_k=ik, init_v=iv)
    slow = lambda q, k, v, g, ik, iv: caterpillar_recurrence(q, k, v, g, cl, ik, iv)
    np.testing.assert_allclose(jax.jit(fast)(*args), jax.jit(slow)(*args), rtol=1e-4, atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    g1 = jax.jit(jax.grad(loss(fast), argnums=tuple(range(6))))(*args)
    g2 = jax.jit(jax.grad(loss(slow), argnums=tuple(range(6))))(*args)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="init_k"):
        caterpillar(q, k, v, gates, length=cl, init_k=ik[:, :1] if cl > 1 else ik[:1, :, :1])
    with pytest.raises(ValueError, match="length"):
        caterpillar(q, k, v, gates, length=0)


@pytest.mark.parametrize("name", ["linear", "delta", "caterpillar"])
def test_layers_are_causal_and_differentiable(name):
    from flax import nnx

    from chunkattn.variants.layers import LAYERS

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, 16))
    layer = LAYERS[name](16, 2, rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, x: m(x))  # compiled once for both calls
    y = run(layer, x)
    assert y.shape == x.shape
    y2 = run(layer, x.at[:, 11:].set(0.0))  # changing the future leaves the past unchanged
    np.testing.assert_allclose(y[:, :11], y2[:, :11], atol=1e-6)
    assert not np.allclose(y[:, 11:], y2[:, 11:])
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    with pytest.raises(NotImplementedError, match="cache"):
        layer(x, cache=object())


def test_layer_knobs_change_the_computation_and_are_checked():
    """FastWeightAttention(nu) is delta_rule on DPFP(ν) features; bad knobs are ValueErrors."""
    from flax import nnx

    from chunkattn.models.gpt import GPTConfig
    from chunkattn.variants.layers import CaterpillarAttention, FastWeightAttention

    x = jax.random.normal(jax.random.PRNGKey(1), (1, 9, 16))
    layer = FastWeightAttention(16, 2, nu=2, rngs=nnx.Rngs(0))
    q, k, v = layer._split(x)  # 3 × (B, T, N, H)
    beta = jax.nn.sigmoid(layer.beta(x))  # (B, T, N)
    want = layer._out(delta_rule(dpfp(q, 2), dpfp(k, 2), v, beta))
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)
    layer.nu = 1
    assert not np.allclose(layer(x), want, atol=1e-4)
    with pytest.raises(ValueError, match="nu"):
        FastWeightAttention(16, 2, nu=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="length=0"):
        CaterpillarAttention(16, 2, height=2, length=0, rngs=nnx.Rngs(0))
    for field in ("dpfp_nu", "caterpillar_heads", "caterpillar_length"):
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{field: 0})


def gated_delta_recurrence(q, k, v, beta, log_decay, w0):
    """The definition, with matrices: W_t = α_t W_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,
    α_t = exp(g_t), y_t = W_t q_t. W is [B, N, Hv, Hk]; returns (y, W_T)."""
    eye = jnp.eye(q.shape[-1])

    def step(w, x):
        qt, kt, vt, bt, gt = x  # (B, N, H), (B, N, H), (B, N, Hv), (B, N), (B, N)
        proj = eye - bt[..., None, None] * jnp.einsum("bnh,bni->bnhi", kt, kt)  # (B, N, H, H)
        w = jnp.exp(gt)[..., None, None] * jnp.einsum("bnvh,bnhi->bnvi", w, proj)
        w = w + bt[..., None, None] * jnp.einsum("bnv,bnh->bnvh", vt, kt)
        return w, jnp.einsum("bnvh,bnh->bnv", w, qt)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, log_decay))
    w, ys = jax.lax.scan(step, w0, xs)
    return jnp.swapaxes(ys, 0, 1), w


def _gated_inputs(t, *, strong=False, seed=0, b=2, n=2, h=4, hv=3):
    """q, k (unit rows), v, β ∈ (0, 1), g ∈ [−1, 0] (strong: half the steps at −20), W₀.

    NumPy, not jax.random: eager random ops would each compile, slower than the test itself.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    q, k, v = normal(b, t, n, h), normal(b, t, n, h), normal(b, t, n, hv)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1 / (1 + np.exp(-normal(b, t, n)))
    g = rng.uniform(-1.0, 0.0, (b, t, n)).astype(np.float32)
    if strong:
        g[rng.random(g.shape) < 0.5] = -20.0
    return q, k, v, beta, g, normal(b, n, hv, h)


GATED_CHUNK = 8


@jax.jit
def _gated_pair(q, k, v, beta, g, w0):
    """(outputs, final states, gradients) of delta_rule and of the recurrence: one compilation
    shared by every test with these shapes."""
    proj = jax.random.normal(jax.random.PRNGKey(5), v.shape)

    def chunked(q, k, v, beta, g, w0):
        y, s = delta_rule(
            q,
            k,
            v,
            beta,
            log_decay=g,
            chunk_size=GATED_CHUNK,
            initial_state=jnp.swapaxes(w0, -1, -2),
            return_state=True,
        )
        return y, jnp.swapaxes(s, -1, -2)  # the state as W [B, N, Hv, Hk]

    out = []
    for fn in (chunked, gated_delta_recurrence):
        # The gradient of Σ y·proj + Σ sin(W): the final state's gradient too (chunked prefill).
        (y, w), vjp = jax.vjp(fn, q, k, v, beta, g, w0)
        out.append((y, w, vjp((proj, jnp.cos(w)))))
    return out


@pytest.mark.parametrize("strong", [False, True], ids=["g_in_-1_0", "half_at_-20"])
def test_gated_delta_rule_matches_the_recurrence(strong):
    """Forward, final state and the gradients of q, k, v, β, log_decay and the initial state, at
    T = 21 (not a multiple of the chunk, 8), with the decay down to −20 per step."""
    args = _gated_inputs(21, strong=strong)
    (y, w, grads), (y_ref, w_ref, grads_ref) = _gated_pair(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
    names = ("q", "k", "v", "beta", "log_decay", "initial_state")
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=name)
    if strong:  # a step at −20 forgets the state before it: the output comes from the token
        assert float(jnp.min(args[4])) == -20.0


def test_delta_rule_state_carried_in_and_out():
    """Chunked prefill in two pieces of 7 tokens (chunks of 4: each piece ends in a padded
    chunk), then 7 tokens of delta_rule_step, equal one pass over all 21 (chunks of 8)."""
    q, k, v, beta, g, w0 = _gated_inputs(21)
    (y_full, w_full, _), _ = _gated_pair(q, k, v, beta, g, w0)
    s = jnp.swapaxes(w0, -1, -2)  # the state is Wᵀ: [B, N, Hk, Hv]
    ys = []
    for lo in (0, 7):
        piece = (x[:, lo : lo + 7] for x in (q, k, v, beta))
        y, s = delta_rule(
            *piece, log_decay=g[:, lo : lo + 7], chunk_size=4, initial_state=s, return_state=True
        )
        ys.append(y)
    step = jax.jit(delta_rule_step)
    for i in range(14, 21):
        y, s = step(s, q[:, i], k[:, i], v[:, i], beta[:, i], g[:, i])
        ys.append(y[:, None])
    assert s.dtype == jnp.float32 and s.shape == (2, 2, 4, 3)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jnp.swapaxes(s, -1, -2), w_full, rtol=1e-4, atol=1e-5)


@jax.jit
def _references(q, k, v, beta, g, w0):
    s0 = jnp.swapaxes(w0, -1, -2)
    zero = jnp.zeros_like(g)
    return (
        delta_rule_reference(q, k, v, beta, log_decay=g, initial_state=s0, return_state=True),
        gated_delta_recurrence(q, k, v, beta, g, w0),
        delta_rule(q, k, v, beta, chunk_size=GATED_CHUNK, initial_state=s0, return_state=True),
        gated_delta_recurrence(q, k, v, beta, zero, w0),
    )


def test_delta_rule_reference_and_the_ungated_state():
    """delta_rule_reference (a scan of delta_rule_step) is the definition; without log_decay
    the chunked form takes and returns the state too."""
    (y, s), (y_def, w_def), (y1, s1), (y1_def, w1_def) = _references(*_gated_inputs(11, seed=1))
    for got, want in ((y, y_def), (y1, y1_def)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for got, want in ((s, w_def), (s1, w1_def)):  # the state is Wᵀ
        np.testing.assert_allclose(jnp.swapaxes(got, -1, -2), want, rtol=1e-4, atol=1e-5)


def test_gated_delta_rule_bf16_inputs():
    """bf16 in, bf16 out, float32 inside: close to the float32 recurrence, state in float32."""
    q, k, v, beta, g, w0 = _gated_inputs(21, strong=True)
    _, (y_ref, w_ref, _) = _gated_pair(q, k, v, beta, g, w0)  # compiled for the test above
    half = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta, g, np.swapaxes(w0, -1, -2)))
    hq, hk, hv, hb, hg, hs = half
    y, s = delta_rule(
        hq, hk, hv, hb, log_decay=hg, chunk_size=GATED_CHUNK, initial_state=hs, return_state=True
    )
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=0.1)
    np.testing.assert_allclose(jnp.swapaxes(s, -1, -2), w_ref, atol=0.1)


def test_delta_rule_argument_errors():
    q, k, v, beta, g, w0 = _gated_inputs(5)
    s0 = np.swapaxes(w0, -1, -2)
    bad = [
        (dict(log_decay=g[..., :1]), r"log_decay must be \[B, T, N\] = \(2, 5, 2\), got \(2, 5, 1"),
        (dict(log_decay=-g), "log_decay must be <= 0 .* got a maximum of"),
        (dict(log_decay=np.full_like(g, np.nan)), "log_decay must be <= 0"),
        (dict(initial_state=w0), r"initial_state must be \[B, N, Hk, Hv\] = \(2, 2, 4, 3\)"),
        (dict(chunk_size=0), "chunk_size must be >= 1, got 0"),
    ]  # fmt: skip
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            delta_rule(q, k, v, beta, **kwargs)
    with pytest.raises(ValueError, match=r"k must be .* got k.shape=\(2, 5, 2, 3\)"):
        delta_rule(q, k[..., :3], v, beta)
    with pytest.raises(ValueError, match=r"v must be \[B, T, N, Hv\]"):
        delta_rule(q, k, v[:, :4], beta)
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, beta[..., 0])
    empty = (x[:, :0] for x in (q, k, v, beta))
    y, s = delta_rule(*empty, initial_state=s0, return_state=True)
    assert y.shape == (2, 0, 2, 3) and np.array_equal(s, s0)  # no tokens: the state unchanged
    one = (q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
    with pytest.raises(ValueError, match=r"q must be \[B, N, Hk\] \(one token\)"):
        delta_rule_step(s0, q, k, v, beta)
    with pytest.raises(ValueError, match=r"state must be \[B, N, Hk, Hv\] = \(2, 2, 4, 3\)"):
        delta_rule_step(w0, *one)
    with pytest.raises(ValueError, match=r"log_decay must be \[B, N\] = \(2, 2\)"):
        delta_rule_step(s0, *one, g)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        delta_rule_step(s0, *one, -g[:, 0])


@pytest.mark.parametrize("attention,layers,prefill", [("gated_delta", 1, 5), ("hybrid", 2, 0)])
def test_gpt_trains_and_decodes_with_gated_delta_layers(attention, layers, prefill):
    """A tiny GPT of Gated DeltaNet layers (or the hybrid g, s): 5 Adam steps lower the loss, and
    decoding through the model's caches (a GatedDeltaCache: recurrent state and the short
    convolution's last inputs, per Gated DeltaNet layer; a KVCache per softmax one), a chunked
    prefill of `prefill` tokens then one token at a time, gives the logits of the full pass."""
    import optax
    from flax import nnx

    from chunkattn.models.gpt import GPT, GPTConfig
    from chunkattn.nn.layers import KVCache
    from chunkattn.variants.layers import GatedDeltaCache, GatedDeltaNet

    cfg = GPTConfig(max_seq_len=12, num_layers=layers, num_heads=2, dim=16, attention=attention)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    caches = model.empty_caches(2)
    kinds = {"gated_delta": [GatedDeltaCache], "hybrid": [GatedDeltaCache, KVCache]}[attention]
    assert [type(c) for c in caches] == kinds
    assert caches[0].state.shape == (2, 2, 8, 8) and caches[0].conv.shape == (2, 3, 48)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12)), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])  # (B, T, V)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, logits

    @jax.jit
    def step(params, opt_state):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, logits

    opt_state, losses = tx.init(params), []
    for _ in range(6):  # the 6th step's logits are those of the trained parameters
        trained = params
        params, opt_state, loss, full = step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses

    decode = jax.jit(lambda p, x, caches: nnx.merge(graphdef, p, rest)(x, caches))
    pieces = ([(0, prefill)] if prefill else []) + [(i, i + 1) for i in range(prefill, 11)]
    got = []
    for lo, hi in pieces:
        logits, caches = decode(trained, tokens[:, lo:hi], caches)
        got.append(logits)
    assert int(caches[0].length) == 11
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="conv_size=0"):
        GatedDeltaNet(16, 2, conv_size=0, rngs=nnx.Rngs(0))


def test_gated_delta_and_hybrid_are_trainer_options():
    """--attention gated_delta / hybrid --hybrid-pattern reach GPTConfig; bad patterns are one
    error line each (the model is built and trained in the test above)."""
    from chunkattn import train
    from chunkattn.models.gpt import GPTConfig

    a = train.parse_args(["--attention", "hybrid", "--hybrid-pattern", "gggs", "--layers", "6"])
    assert a.hybrid_pattern == "gggs" and a.sample > 0  # both kinds decode: a sample at the end
    cfg = GPTConfig(attention="hybrid", num_layers=6, hybrid_pattern=a.hybrid_pattern)
    assert cfg.layer_attention == ("gated_delta",) * 3 + ("chunked",) + ("gated_delta",) * 2
    assert train.parse_args(["--attention", "gated_delta"]).sample > 0
    assert GPTConfig(attention="gated_delta", num_layers=2).layer_attention == ("gated_delta",) * 2
    bad = [
        (["--attention", "hybrid", "--hybrid-pattern", "gx"], "must be letters g/s"),
        (["--attention", "hybrid", "--layers", "1"], "num_layers=1 gives only gated_delta layers"),
        (["--attention", "hybrid", "--hybrid-pattern", "ss"], "a hybrid needs both"),
        (["--hybrid-pattern", "gs"], "--hybrid-pattern applies to --attention hybrid, not chunked"),
    ]
    for argv, message in bad:
        with pytest.raises(train.UsageError, match=message):
            train.parse_args(argv)
