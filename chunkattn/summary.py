"""The card's primitives: a chunk's softmax summary, and the log-sum-exp merge of two.

For one query chunk and one key/value chunk, with scores s = scale·q·kᵀ (float32):

    max_score   = max_k s                       (stop-gradient: the result does not depend on it)
    w           = exp(s − max_score)
    exp_weights = Σ_k w
    exp_values  = w · v

Two summaries of the same queries over disjoint keys merge exactly (m = max(m1, m2),
a_i = exp(m_i − m)): exp_values = a1·v1 + a2·v2, exp_weights = a1·w1 + a2·w2. The attention
output is exp_values / exp_weights and lse = max_score + log(exp_weights). A row that sees no key
has max_score = −inf, exp_weights = 0; it merges as the identity and finishes as output 0,
lse = −inf.

Layout (head-major, like lse): exp_values [B, N, tq, Hv], exp_weights and max_score [B, N, tq],
all float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ChunkSummary(NamedTuple):
    """Softmax statistics of some queries over some keys (see module docstring)."""

    exp_values: Array  # f32 [B, N, tq, Hv]
    exp_weights: Array  # f32 [B, N, tq]
    max_score: Array  # f32 [B, N, tq]

    @classmethod
    def empty(
        cls, batch: int, num_heads: int, tq: int, head_dim_v: int, dtype: Any = jnp.float32
    ) -> ChunkSummary:
        """The identity of `merge`: a summary over no keys."""
        return cls(
            jnp.zeros((batch, num_heads, tq, head_dim_v), dtype),
            jnp.zeros((batch, num_heads, tq), dtype),
            jnp.full((batch, num_heads, tq), -jnp.inf, dtype),
        )

    def output(self, dtype: Any = None) -> Array:
        """exp_values / exp_weights as [B, tq, N, Hv] (0 for rows that saw no key)."""
        w = self.exp_weights[..., None]
        out = jnp.where(w > 0, self.exp_values / jnp.where(w > 0, w, 1.0), 0.0)
        out = jnp.swapaxes(out, -3, -2)  # (B, tq, N, Hv)
        return out if dtype is None else out.astype(dtype)

    def lse(self) -> Array:
        """log Σ exp(s) per row, [B, N, tq]; −inf for rows that saw no key."""
        w = self.exp_weights
        return jnp.where(w > 0, self.max_score + jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def accum_dtype(dtype: Any) -> Any:
    """Scores, sums and accumulators: float32, or float64 for float64 inputs (under x64)."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def output_delta(out: Array, dout: Array, dlse: Array) -> Array:
    """D = rowsum(dO ∘ O) − dlse of the FlashAttention backward, float32 [B, N, T].

    out, dout [B, T, N, Hv]; dlse [B, N, T]. An elementwise product and a sum, in the
    accumulation dtype: not an einsum, which backends may run as a reduced-precision matmul
    (TF32 on GPU, bfloat16 passes on TPU at default precision), while every dS = P ∘ (dP − D)
    depends on D's last bits.
    """
    adt = accum_dtype(out.dtype)
    d = jnp.sum(dout.astype(adt) * out.astype(adt), axis=-1)  # (B, T, N)
    return jnp.swapaxes(d, 1, 2) - dlse.astype(adt)


def sink_summary(
    sinks: Array, batch: int, tq: int, head_dim_v: int, dtype: Any = jnp.float32
) -> ChunkSummary:
    """The summary of a sink (DESIGN §3): max_score = sink_h, exp_weights = 1, exp_values = 0.

    Merged into a row's summary once, it joins the softmax denominator and carries no value;
    a row that sees no key then gives output 0 and lse = sink_h. Unlike a chunk's max_score, this
    one is the sink's value itself, so it is not stop-gradient: lse depends on it.
    """
    num_heads = sinks.shape[0]
    m = jnp.broadcast_to(sinks.astype(dtype)[None, :, None], (batch, num_heads, tq))
    return ChunkSummary(
        jnp.zeros((batch, num_heads, tq, head_dim_v), dtype),
        jnp.where(m > -jnp.inf, 1.0, 0.0).astype(dtype),
        m,
    )


def row_start(
    sinks: Array | None, batch: int, num_heads: int, tq: int, head_dim_v: int, dtype: Any
) -> ChunkSummary:
    """Where each row's merge loop starts: its head's sink summary, or the empty summary."""
    if sinks is None:
        return ChunkSummary.empty(batch, num_heads, tq, head_dim_v, dtype)
    return sink_summary(sinks, batch, tq, head_dim_v, dtype)


def _finite_or_zero(m: Array) -> Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def summarize_scores(
    s: Array,
    value: Array,
    *,
    keep: Array | None = None,
    keep_scale: float = 1.0,
    precision: Any = None,
) -> ChunkSummary:
    """Summary of masked float32 scores s [B, N, tq, tk] (−inf = masked) over value [B, tk, K, Hv].

    `keep` (bool, broadcastable to s) applies dropout to the weights that multiply the values,
    scaled by `keep_scale`; exp_weights (the softmax denominator) is never dropped.
    """
    batch, num_heads, tq, tk = s.shape
    num_kv_heads = value.shape[2]
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))  # (B, N, tq)
    w = jnp.exp(s - _finite_or_zero(m)[..., None])  # masked: exp(-inf) = 0
    exp_weights = jnp.sum(w, axis=-1)
    if keep is not None:
        w = jnp.where(keep, w * keep_scale, 0.0)
    wg = w.astype(value.dtype).reshape(batch, num_kv_heads, -1, tk)  # (B, K, G·tq, tk)
    exp_values = weights_times_values(wg, kv_heads_major(value), precision=precision)
    return ChunkSummary(exp_values.reshape(batch, num_heads, tq, -1), exp_weights, m)


def grouped_heads(x: Array, num_kv_heads: int) -> Array:
    """[B, t, N, H] -> [B, K, G·t, H]: the query heads of each kv head stacked along rows.

    The block products below take their [t, t] operands in this layout, and their key/value
    operands as `keys_transposed` / `kv_heads_major`, so each is one batched row-major matmul
    over (B, K): no [t, t] block is ever transposed, and a key block is laid out once for all
    the query blocks that use it (XLA:CPU otherwise computed score blocks transposed and moved
    them back, ~1 ms per 512² block, and re-laid out the key block for every pair).
    """
    batch, t, num_heads, head_dim = x.shape
    groups = num_heads // num_kv_heads
    x = x.reshape(batch, t, num_kv_heads, groups, head_dim)
    return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(batch, num_kv_heads, groups * t, head_dim)


def ungrouped_heads(x: Array, t: int) -> Array:
    """[B, K, G·t, H] -> [B, t, N, H]: the inverse of `grouped_heads`."""
    batch, num_kv_heads, rows, head_dim = x.shape
    x = x.reshape(batch, num_kv_heads, rows // t, t, head_dim)
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(batch, t, -1, head_dim)


def _bdot(a: Array, b: Array, contract: tuple[int, int], batch: tuple, precision, dtype) -> Array:
    dims = (((contract[0],), (contract[1],)), batch)
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=dtype)


def kv_heads_major(x: Array) -> Array:
    """[B, t, K, H] -> [B, K, t, H]: a key or value block as the right operand of w·v."""
    return jnp.transpose(x, (0, 2, 1, 3))


def keys_transposed(x: Array) -> Array:
    """[B, t, K, H] -> [B, K, H, t]: a key (or value) block as the right operand of q·kᵀ."""
    return jnp.transpose(x, (0, 2, 3, 1))


def scores_grouped(qg: Array, key_t: Array, *, precision: Any = None) -> Array:
    """q·kᵀ in float32: qg [B, K, G·tq, H] (`grouped_heads`), key_t [B, K, H, tk]
    (`keys_transposed`) -> [B, K, G·tq, tk]."""
    return _bdot(qg, key_t, (3, 2), ((0, 1), (0, 1)), precision, accum_dtype(qg.dtype))


def weights_times_values(wg: Array, value_h: Array, *, precision: Any = None) -> Array:
    """w·v: wg [B, K, G·tq, tk], value_h [B, K, tk, Hv] (`kv_heads_major`) -> float32
    [B, K, G·tq, Hv]."""
    return _bdot(wg, value_h, (3, 2), ((0, 1), (0, 1)), precision, accum_dtype(wg.dtype))


def transposed_times(ag: Array, bg: Array, *, precision: Any = None) -> Array:
    """aᵀ·b over the stacked rows: ag [B, K, G·tq, Ha], bg [B, K, G·tq, tk] -> float32
    [B, K, Ha, tk] (the backward's dVᵀ = dOᵀ·P and dKᵀ = Qᵀ·dS, with the big operand
    contracted along its rows, as a row-major matmul wants it)."""
    return _bdot(ag, bg, (2, 2), ((0, 1), (0, 1)), precision, accum_dtype(ag.dtype))


def chunk_scores(query: Array, key: Array, *, scale: float, precision: Any = None) -> Array:
    """scale · q · kᵀ in float32: query [B, tq, N, H], key [B, tk, K, H] -> [B, N, tq, tk]."""
    batch, tq, num_heads, _ = query.shape
    qg = grouped_heads(query, key.shape[2])  # (B, K, G·tq, H)
    s = scores_grouped(qg, keys_transposed(key), precision=precision)  # (B, K, G·tq, tk)
    return s.reshape(batch, num_heads, tq, key.shape[1]) * scale


def summarize(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    logits_soft_cap: float | None = None,
    precision: Any = None,
) -> ChunkSummary:
    """Summarise one query chunk against one key/value chunk.

    Args:
      query: [B, tq, N, H]; key: [B, tk, K, H]; value: [B, tk, K, Hv], K dividing N.
      scale: score scale, default 1/√H.
      bias: float, broadcastable to [B, N, tq, tk], added after the soft cap.
      mask: bool, broadcastable to [B, N, tq, tk]; True = may attend.
      logits_soft_cap: if set, scores become cap·tanh(s/cap) before the bias.

    Returns:
      ChunkSummary(exp_values [B, N, tq, Hv], exp_weights [B, N, tq], max_score [B, N, tq]).

    Example:
        >>> a = summarize(q, k[:, :128], v[:, :128])
        >>> b = summarize(q, k[:, 128:], v[:, 128:])
        >>> out = merge(a, b).output()  # == softmax attention of q over all of k, v
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    s = chunk_scores(query, key, scale=scale, precision=precision)
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return summarize_scores(s, value, precision=precision)


def merge(a: ChunkSummary, b: ChunkSummary) -> ChunkSummary:
    """Exact log-sum-exp merge of two summaries of the same queries over disjoint keys."""
    m = jnp.maximum(a.max_score, b.max_score)
    m_safe = _finite_or_zero(m)
    alpha = jnp.exp(a.max_score - m_safe)  # −inf − finite -> 0: an empty side contributes 0
    beta = jnp.exp(b.max_score - m_safe)
    return ChunkSummary(
        exp_values=alpha[..., None] * a.exp_values + beta[..., None] * b.exp_values,
        exp_weights=alpha * a.exp_weights + beta * b.exp_weights,
        max_score=m,
    )


def merge_stacked(stacked: ChunkSummary) -> ChunkSummary:
    """Merge summaries stacked along a leading axis (disjoint keys each) into one, in one step.

    The n-ary form of `merge`: m = max_i m_i, a_i = exp(m_i − m), Σ_i a_i·v_i, Σ_i a_i·w_i.
    """
    m = jnp.max(stacked.max_score, axis=0)
    alpha = jnp.exp(stacked.max_score - _finite_or_zero(m))  # (W, B, N, tq); empty parts -> 0
    return ChunkSummary(
        exp_values=jnp.sum(alpha[..., None] * stacked.exp_values, axis=0),
        exp_weights=jnp.sum(alpha * stacked.exp_weights, axis=0),
        max_score=m,
    )
