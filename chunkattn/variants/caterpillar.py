"""Caterpillar (F. Fleuret): gated recurrent keys/values with period CL, read by a windowed softmax.

With CH rows r, heads h and CL = `length`:
    A_{r,t} = 1 − Σ_h G_{h,r,t};  K̃_{r,t} = Σ_h G_{h,r,t} k_{h,t}  (Ṽ alike)
    rec_K[r,t] = A_{r,t} rec_K[r,t−CL] + K̃_{r,t}   (positions −CL…−1 hold init_k)
    y_{h,t} = softmax over (r, l) of q_{h,t}·rec_K[r, t−CL+1+l]/√Hk, weighting rec_V[r, t−CL+1+l].
The recurrence runs over periods p = t // CL by `jax.lax.associative_scan` (each residue
t mod CL is an independent linear recurrence). Work and memory O(T·CH·CL·H), never [T, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _recurrence(a: Array, x: Array, init: Array, cl: int) -> Array:
    """rec[t] = a[t] rec[t−CL] + x[t]; a (B, T', CH), x (B, T', CH, H), T' multiple of CL."""
    b, tp, ch, h = x.shape
    p = tp // cl
    a = a.reshape(b, p, cl, ch)[..., None]  # (B, P, CL, CH, 1)
    x = x.reshape(b, p, cl, ch, h)  # (B, P, CL, CH, H)
    init = jnp.swapaxes(init, 0, 1)  # (CL, CH, H)
    x = x.at[:, 0].add(a[:, 0] * init)

    def combine(e1, e2):
        a1, x1 = e1
        a2, x2 = e2
        return a1 * a2, a2 * x1 + x2

    _, rec = jax.lax.associative_scan(combine, (a, x), axis=1)
    return rec.reshape(b, tp, ch, h)


def caterpillar(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    *,
    length: int,
    init_k: Array | None = None,
    init_v: Array | None = None,
) -> Array:
    """Caterpillar attention.

    Args:
      q, k: [B, T, N, Hk]; v: [B, T, N, Hv]; gates: [B, T, N, CH] in (0, 1).
      length: the period CL (>= 1).
      init_k: [CH, CL, Hk] values at positions −CL…−1 (zeros by default); init_v: [CH, CL, Hv].

    Returns:
      [B, T, N, Hv] in q's dtype (float32 accumulation).

    Example:
      >>> y = caterpillar(q, k, v, jax.nn.sigmoid(g) / ch, length=16)
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, N, Hk] of equal shape, got {q.shape}, {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, N, Hv] matching q {q.shape}, got {v.shape}")
    if gates.ndim != 4 or gates.shape[:3] != q.shape[:3]:
        raise ValueError(f"gates must be [B, T, N, CH] matching q {q.shape}, got {gates.shape}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    b, t, n, hk = q.shape
    hv, ch, cl = v.shape[-1], gates.shape[-1], length
    f32 = jnp.float32
    init_k = jnp.zeros((ch, cl, hk), f32) if init_k is None else init_k.astype(f32)
    init_v = jnp.zeros((ch, cl, hv), f32) if init_v is None else init_v.astype(f32)
    if init_k.shape != (ch, cl, hk):
        raise ValueError(f"init_k must be [CH, CL, Hk] = {(ch, cl, hk)}, got {init_k.shape}")
    if init_v.shape != (ch, cl, hv):
        raise ValueError(f"init_v must be [CH, CL, Hv] = {(ch, cl, hv)}, got {init_v.shape}")
    pad = -t % cl
    g = jnp.pad(gates.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)])  # (B, T', N, CH)
    kp = jnp.pad(k.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)])
    vp = jnp.pad(v.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)])
    a = 1.0 - jnp.sum(g, axis=2)  # (B, T', CH)
    rk = _recurrence(a, jnp.einsum("btnr,btnh->btrh", g, kp), init_k, cl)  # (B, T', CH, Hk)
    rv = _recurrence(a, jnp.einsum("btnr,btnh->btrh", g, vp), init_v, cl)  # (B, T', CH, Hv)
    # Prepend the initial states: full[CL + s] = rec[s]; window of t is full[t+1 … t+CL].
    fk = jnp.concatenate(
        [jnp.broadcast_to(jnp.swapaxes(init_k, 0, 1), (b, cl, ch, hk)), rk[:, :t]], 1
    )
    fv = jnp.concatenate(
        [jnp.broadcast_to(jnp.swapaxes(init_v, 0, 1), (b, cl, ch, hv)), rv[:, :t]], 1
    )
    wk = jnp.stack([fk[:, 1 + l : 1 + l + t] for l in range(cl)], axis=2)  # (B, T, CL, CH, Hk)
    wv = jnp.stack([fv[:, 1 + l : 1 + l + t] for l in range(cl)], axis=2)  # (B, T, CL, CH, Hv)
    s = jnp.einsum("btnh,btlrh->btnlr", q.astype(f32), wk) / jnp.sqrt(f32(hk))  # (B,T,N,CL,CH)
    p = jax.nn.softmax(s.reshape(b, t, n, cl * ch), axis=-1).reshape(s.shape)
    y = jnp.einsum("btnlr,btlrv->btnv", p, wv)  # (B, T, N, Hv)
    return y.astype(q.dtype)
