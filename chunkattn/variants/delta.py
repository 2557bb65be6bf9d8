"""Delta-rule fast weights (Schlag et al. 2021), chunkwise-parallel (Yang et al. 2024).

    W_0 = 0,  W_t = W_{t−1} + β_t (v_t − W_{t−1} k_t) k_tᵀ,  y_t = W_t q_t

Per chunk of C tokens (state S = Wᵀ [Hk, Hv] carried by `lax.scan`): the WY/UT transform
T = (I + tril(diag(β) K Kᵀ, −1))⁻¹ diag(β) gives W' = T K, U = T V; the corrected values are
U' = U − W' S; output O = Q S + tril(Q Kᵀ) U'; new state S + Kᵀ U'. Work O(T·C·H + T·H²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def delta_rule(q: Array, k: Array, v: Array, beta: Array, *, chunk_size: int = 64) -> Array:
    """Causal delta-rule fast-weight attention.

    Args:
      q, k: [B, T, N, Hk]; v: [B, T, N, Hv]; beta: [B, T, N] (usually in (0, 1)).
      chunk_size: tokens per chunk C (T need not be a multiple).

    Returns:
      [B, T, N, Hv] in q's dtype (float32 accumulation).

    Example:
      >>> y = delta_rule(q, k, v, jax.nn.sigmoid(b), chunk_size=32)
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, N, Hk] of equal shape, got {q.shape}, {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, N, Hv] matching q {q.shape}, got {v.shape}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, N] = {q.shape[:3]}, got {beta.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    c = min(chunk_size, t)
    nc = -(-t // c)
    pad = nc * c - t

    def prep(x):  # (B, T, N, ...) -> (nc, B, N, C, ...)
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, nc, c) + x.shape[2:])  # (B, nc, C, N, ...)
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)  # (nc, B, N, C, ...)

    qs, ks, vs, bs = prep(q), prep(k), prep(v), prep(beta)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    causal = jnp.tril(jnp.ones((c, c), bool))
    eye = jnp.eye(c, dtype=jnp.float32)

    def step(s, x):
        qc, kc, vc, bc = x  # (B,N,C,Hk) ×2, (B,N,C,Hv), (B,N,C)
        kk = jnp.einsum("bnih,bnjh->bnij", kc, kc)  # (B, N, C, C)
        a = jnp.where(strict, bc[..., :, None] * kk, 0.0)
        tmat = jax.scipy.linalg.solve_triangular(
            eye + a, jnp.broadcast_to(eye, a.shape) * bc[..., None, :], lower=True
        )  # (I + A)⁻¹ diag(β): (B, N, C, C)
        w = jnp.einsum("bnij,bnjh->bnih", tmat, kc)  # (B, N, C, Hk)
        u = jnp.einsum("bnij,bnjv->bniv", tmat, vc)  # (B, N, C, Hv)
        u = u - jnp.einsum("bnih,bnhv->bniv", w, s)
        qk = jnp.where(causal, jnp.einsum("bnih,bnjh->bnij", qc, kc), 0.0)
        o = jnp.einsum("bnih,bnhv->bniv", qc, s) + jnp.einsum("bnij,bnjv->bniv", qk, u)
        s = s + jnp.einsum("bnih,bniv->bnhv", kc, u)
        return s, o

    s0 = jnp.zeros((b, n, hk, hv), jnp.float32)
    _, o = jax.lax.scan(jax.checkpoint(step), s0, (qs, ks, vs, bs))  # (nc, B, N, C, Hv)
    o = jnp.moveaxis(o, 0, 1)  # (B, nc, N, C, Hv)
    o = jnp.swapaxes(o, 2, 3).reshape(b, nc * c, n, hv)[:, :t]
    return o.astype(q.dtype)
