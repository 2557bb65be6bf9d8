"""The historical baseline: Rabe & Staats, "Self-attention Does Not Need O(n²) Memory".

Their algorithm (arXiv 2112.05682, Figure 1), written here in JAX as they describe it: a
`lax.map` over query chunks; for each, the key chunks' summaries (values, weights, max score)
are all computed by a map under `jax.checkpoint` and then combined; differentiation goes
through plain autodiff of that program, so the backward pass re-runs the checkpointed chunks.
This is the O(√n)-memory, slow-backward reference point the chunked core improves on. Full
(non-causal) or causal attention only; no GQA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _query_chunk_attention(query, key, value, q_start, causal, key_chunk_size):
    """One query chunk [B, tq, N, H] against all keys, by checkpointed key-chunk summaries."""
    batch, num_kv, num_heads, head_dim = key.shape
    tq = query.shape[1]
    key_chunk_size = min(key_chunk_size, num_kv)
    query = query / jnp.sqrt(head_dim).astype(query.dtype)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def summarize_chunk(query, key, value, k_start):
        s = jnp.einsum("bqnh,bknh->bnqk", query, key, preferred_element_type=jnp.float32)
        if causal:
            rows = q_start + jnp.arange(tq)[:, None]
            cols = k_start + jnp.arange(key.shape[1])[None, :]
            s = jnp.where(cols <= rows, s, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(s - m)
        values = jnp.einsum(
            "bnqk,bknh->bnqh", w.astype(value.dtype), value, preferred_element_type=jnp.float32
        )
        return values, w.sum(axis=-1), m[..., 0]

    def chunk_scanner(k_start):
        k = jax.lax.dynamic_slice_in_dim(key, k_start, key_chunk_size, axis=1)
        v = jax.lax.dynamic_slice_in_dim(value, k_start, key_chunk_size, axis=1)
        return summarize_chunk(query, k, v, k_start)

    values, weights, maxes = jax.lax.map(chunk_scanner, jnp.arange(0, num_kv, key_chunk_size))
    global_max = jnp.max(maxes, axis=0)
    diffs = jnp.exp(maxes - global_max)
    values = jnp.sum(values * diffs[..., None], axis=0)
    weights = jnp.sum(weights * diffs, axis=0)
    return jnp.swapaxes(values / weights[..., None], 1, 2)  # (B, tq, N, H)


def attention(query, key, value, *, is_causal=False, query_chunk_size=1024, key_chunk_size=4096):
    """Rabe & Staats attention on [B, T, N, H] inputs (T and S divisible by the chunk sizes)."""
    seq_q = query.shape[1]
    query_chunk_size = min(query_chunk_size, seq_q)

    def chunk(q_start):
        q = jax.lax.dynamic_slice_in_dim(query, q_start, query_chunk_size, axis=1)
        return _query_chunk_attention(q, key, value, q_start, is_causal, key_chunk_size)

    out = jax.lax.map(chunk, jnp.arange(0, seq_q, query_chunk_size))  # (nq, B, tq, N, Hv)
    out = jnp.moveaxis(out, 0, 1).reshape(query.shape[0], seq_q, *out.shape[3:])
    return out.astype(query.dtype)
