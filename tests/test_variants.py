"""Linear-time variants against their step-by-step recurrences, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkattn.variants import dpfp, linear_attention


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
    got = linear_attention(q, k, v, feature_map=fm, normalize=normalize, chunk_size=chunk)
    want = linear_recurrence(q, k, v, phi, normalize)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    proj = jax.random.normal(jax.random.PRNGKey(9), want.shape)
    g = jax.grad(
        lambda *a: jnp.sum(
            linear_attention(*a, feature_map=fm, normalize=normalize, chunk_size=chunk) * proj
        ),
        argnums=(0, 1, 2),
    )
    w = jax.grad(
        lambda *a: jnp.sum(linear_recurrence(*a, phi, normalize) * proj), argnums=(0, 1, 2)
    )
    for a, b in zip(g(q, k, v), w(q, k, v), strict=True):
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
