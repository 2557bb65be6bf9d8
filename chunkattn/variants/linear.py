"""Causal linear attention (Katharopoulos et al. 2020) and DPFP features (Schlag et al. 2021).

    y_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s  [ / Σ_{s≤t} φ(q_t)·φ(k_s)  when normalize ]

Chunked: a `lax.scan` over chunks of C tokens carries the state S = Σ φ(k)ᵀv [Hk, Hv] and the
normaliser z = Σ φ(k) [Hk]; inside a chunk the causal part is the masked product φ(Q)φ(K)ᵀ V.
Work O(T·C·H + T·H²), memory O(T·H + C²) per head — never [T, T].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def dpfp(x: Array, nu: int = 1) -> Array:
    """Deterministic parameter-free projection: [..., d] -> [..., 2·d·nu], summing to 1.

    r = [relu(x), relu(−x)]; features r_i · r_{(i+j) mod 2d} for j = 1..nu, divided by their
    sum (+1e-6).
    """
    if nu < 1:
        raise ValueError(f"dpfp: nu must be >= 1, got {nu}")
    r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)  # (..., 2d)
    feats = jnp.concatenate([r * jnp.roll(r, -j, axis=-1) for j in range(1, nu + 1)], axis=-1)
    return feats / (jnp.sum(feats, axis=-1, keepdims=True) + 1e-6)


def _feature_map(name: str | Callable[[Array], Array] | None) -> Callable[[Array], Array]:
    if name is None:
        return lambda x: x
    if callable(name):
        return name
    if name == "elu1":
        return lambda x: jax.nn.elu(x) + 1.0
    raise ValueError(f"feature_map must be 'elu1', None or a callable, got {name!r}")


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    feature_map: str | Callable[[Array], Array] | None = "elu1",
    normalize: bool = True,
    chunk_size: int = 64,
) -> Array:
    """Causal linear attention, chunked.

    Args:
      q, k: [B, T, N, Hk]; v: [B, T, N, Hv].
      feature_map: "elu1" (elu(x) + 1), None (identity) or a callable applied to q and k.
      normalize: divide by Σ_{s≤t} φ(q_t)·φ(k_s).
      chunk_size: tokens per chunk (T need not divide it).

    Returns:
      [B, T, N, Hv] in v's dtype (accumulated in float32).

    Example:
        >>> y = linear_attention(q, k, v, feature_map=dpfp, chunk_size=64)
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"linear_attention takes q, k [B, T, N, Hk] and v [B, T, N, Hv], got "
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    phi = _feature_map(feature_map)
    batch, seq, heads, _ = q.shape
    c = min(chunk_size, seq)
    pad = -seq % c
    fq, fk = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
    vf = v.astype(jnp.float32)
    fq, fk, vf = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (fq, fk, vf))
    n_chunks = (seq + pad) // c
    # (nc, B, N, C, H): chunks first for the scan
    to_chunks = lambda x: x.reshape(batch, n_chunks, c, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4)
    fq, fk, vf = to_chunks(fq), to_chunks(fk), to_chunks(vf)
    causal = jnp.tril(jnp.ones((c, c), bool))
    # Padding rows (past T) get denominator 1: their 0/0 would poison the gradients.
    real = (jnp.arange(n_chunks * c) < seq).reshape(n_chunks, 1, 1, c)

    def step(carry, chunk):
        state, z = carry  # (B, N, Hk, Hv), (B, N, Hk)
        qc, kc, vc, real_c = chunk  # (B, N, C, Hk), (B, N, C, Hk), (B, N, C, Hv), (1, 1, C)
        a = jnp.where(causal, jnp.einsum("bnqh,bnkh->bnqk", qc, kc), 0.0)  # (B, N, C, C)
        num = jnp.einsum("bnqh,bnhv->bnqv", qc, state) + jnp.einsum("bnqk,bnkv->bnqv", a, vc)
        out = num
        if normalize:
            den = jnp.einsum("bnqh,bnh->bnq", qc, z) + jnp.sum(a, axis=-1)  # (B, N, C)
            out = num / jnp.where(real_c, den, 1.0)[..., None]
        state = state + jnp.einsum("bnkh,bnkv->bnhv", kc, vc)
        z = z + jnp.sum(kc, axis=2)
        return (state, z), out

    init = (
        jnp.zeros((batch, heads, fk.shape[-1], vf.shape[-1]), jnp.float32),
        jnp.zeros((batch, heads, fk.shape[-1]), jnp.float32),
    )
    _, out = jax.lax.scan(step, init, (fq, fk, vf, real))  # (nc, B, N, C, Hv)
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, n_chunks * c, heads, vf.shape[-1])
    return out[:, :seq].astype(v.dtype)
