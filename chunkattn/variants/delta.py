"""Delta-rule fast weights (Schlag et al. 2021), chunkwise-parallel (Yang et al. 2024).

    W_0 = 0,  W_t = W_{t−1} + β_t (v_t − W_{t−1} k_t) k_tᵀ,  y_t = W_t q_t

Per chunk of C tokens (state S = Wᵀ [Hk, Hv] carried by `lax.scan`): the WY/UT transform
T = (I + tril(diag(β) K Kᵀ, −1))⁻¹ diag(β) gives W' = T K, U = T V; the corrected values are
U' = U − W' S; output O = Q S + tril(Q Kᵀ) U'; new state S + Kᵀ U'. Work O(T·C·H + T·H²).

(I + A)⁻¹ is computed by `_unit_lower_inverse` (recursive doubling on the diagonal blocks: log₂ C
levels of batched matmuls), not by `jax.scipy.linalg.solve_triangular`. On CPU the latter is a
LAPACK custom call (`lapack_strsm_ffi`, jaxlib 0.10) that, once batch · C³ ≥ 2·10⁵ (C = 64:
any B·N ≥ 2), splits its batch over XLA's intra-op thread pool and blocks in `ParallelBatchMap`
until the pieces finish. The backward pass has several independent solves per chunk (the
rematerialized forward one, two transposed ones), and XLA:CPU runs independent thunks
concurrently on that same pool; when every pool thread (2 on a 2-core machine) is blocked in
such a solve, nothing is left to run the queued pieces and the process deadlocks (issue 13:
`chunkattn-train --attention delta`, `bench/speed.py … variant_delta`). Matmuls never block on
the pool, and the doubling is as accurate as the triangular solve in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _unit_lower_inverse(a: Array) -> Array:
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], without a triangular solve.

    Recursive doubling: with X₁₁, X₂₂ the inverses of the two diagonal s×s blocks of a 2s×2s
    diagonal block and A₂₁ its lower-left block, that block's inverse is
    [[X₁₁, 0], [−X₂₂ A₂₁ X₁₁, X₂₂]]. Starting from the 1×1 blocks (all 1), log₂ C levels of
    batched s×s matmuls (float32 at HIGHEST precision) give the whole inverse; C is padded to a
    power of two with zeros, which leaves the leading C×C block of the inverse unchanged.
    """
    c = a.shape[-1]
    cp = 1 << (c - 1).bit_length()  # next power of two >= c
    batch = a.shape[:-2]
    if cp != c:
        a = jnp.pad(a, [(0, 0)] * len(batch) + [(0, cp - c), (0, cp - c)])
    hi = jax.lax.Precision.HIGHEST
    x = jnp.ones(batch + (cp, 1, 1), a.dtype)  # (..., m, s, s): inverses of the diagonal blocks
    s = 1
    while s < cp:
        m = cp // (2 * s)
        lower_left = a.reshape(batch + (m, 2, s, m, 2, s))[..., :, 1, :, :, 0, :]
        a21 = jnp.moveaxis(jnp.diagonal(lower_left, axis1=-4, axis2=-2), -1, -3)  # (..., m, s, s)
        xr = x.reshape(batch + (m, 2, s, s))
        x11, x22 = xr[..., 0, :, :], xr[..., 1, :, :]
        x21 = -jnp.matmul(x22, jnp.matmul(a21, x11, precision=hi), precision=hi)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        x = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
        s *= 2
    return x.reshape(batch + (cp, cp))[..., :c, :c]


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

    def step(s, x):
        qc, kc, vc, bc = x  # (B,N,C,Hk) ×2, (B,N,C,Hv), (B,N,C)
        kk = jnp.einsum("bnih,bnjh->bnij", kc, kc)  # (B, N, C, C)
        a = jnp.where(strict, bc[..., :, None] * kk, 0.0)
        tmat = _unit_lower_inverse(a) * bc[..., None, :]  # (I + A)⁻¹ diag(β): (B, N, C, C)
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
