"""The dense oracle: attention computed at full [B, N, T, S], written for clarity.

`reference_attention` upcasts to float32 (float64 under x64) and builds every mask densely from
its definition, independently of `masks.py`, so tests of the chunked and fused paths compare
against code that shares none of their mask logic. `dense_attention` is the same computation in
the inputs' dtype with float32 accumulation; `dot_product_attention(implementation="xla")`
calls it. Both differentiate by plain autodiff.

Inputs here are already validated and normalised by `arguments.py` (4-D, masks/biases 4-D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from chunkattn import masks
from chunkattn.arguments import normalize_arguments
from chunkattn.summary import accum_dtype

Array = jax.Array


def _dense_mask(
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_k: int,
    *,
    mask: Array | None,
    is_causal: bool,
    local_window_size: tuple[int, int] | None,
    q_offset: Array,
    query_seq_lengths: Array | None,
    key_value_seq_lengths: Array | None,
    segment_ids: tuple[Array, Array] | None,
    mask_fn: Callable[..., Array] | None,
) -> Array:
    """Boolean [B, N, T, S]: True where query i may attend key j."""
    rows = jnp.arange(seq_q, dtype=jnp.int32)[None, None, :, None]  # (1, 1, T, 1)
    cols = jnp.arange(seq_k, dtype=jnp.int32)[None, None, None, :]  # (1, 1, 1, S)
    qpos = rows + q_offset.astype(jnp.int32)[:, None, None, None]  # (B, 1, T, 1)
    allowed = jnp.ones((batch, num_heads, seq_q, seq_k), dtype=bool)
    if mask is not None:
        allowed &= mask
    # Key j − row r compared with the offset, never offset ± bound (that could wrap): j ≤ r +
    # off + right ⇔ off ≥ (j − r) − right, which holds outright when (j − r) − right < int32 min.
    rel = cols - rows  # (1, 1, T, S), small
    off = q_offset.astype(jnp.int32)[:, None, None, None]  # (B, 1, 1, 1)
    if is_causal:
        allowed &= off >= rel
    if local_window_size is not None:
        left, right = local_window_size
        i32 = jnp.iinfo(jnp.int32)
        allowed &= (rel < i32.min + right) | (off >= rel - right)
        allowed &= (rel > i32.max - left) | (off <= rel + left)
    if query_seq_lengths is not None:
        allowed &= rows < query_seq_lengths[:, None, None, None]
    if key_value_seq_lengths is not None:
        allowed &= cols < key_value_seq_lengths[:, None, None, None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        allowed &= q_seg[:, None, :, None] == kv_seg[:, None, None, :]
    if mask_fn is not None:
        b = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
        h = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None]
        allowed &= jnp.broadcast_to(mask_fn(b, h, qpos, cols), allowed.shape)
    return allowed


def dense_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
    q_offset: Array | None = None,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    segment_ids: tuple[Array, Array] | None = None,
    mask_fn: Callable[..., Array] | None = None,
    score_fn: Callable[..., Array] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
    broadcast_dropout: bool = True,
    sinks: Array | None = None,
    precision: Any = None,
) -> tuple[Array, Array]:
    """Dense attention on normalised 4-D inputs; returns (out [B,T,N,Hv], lse f32 [B,N,T]).

    `sinks` [N] is a column appended to every row's scores that carries no value (gpt-oss).
    """
    batch, seq_q, num_heads, head_dim = query.shape
    _, seq_k, num_kv_heads, _ = key.shape
    groups = num_heads // num_kv_heads
    acc = accum_dtype(query.dtype)
    if q_offset is None:
        q_offset = jnp.zeros((batch,), jnp.int32)
    q5 = query.reshape(batch, seq_q, num_kv_heads, groups, head_dim)
    # (B, K, G, T, S) -> (B, N, T, S)
    s = jnp.einsum(
        "btkgh,bskh->bkgts", q5, key, precision=precision, preferred_element_type=acc
    ).reshape(batch, num_heads, seq_q, seq_k)
    s = s * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + bias.astype(acc)
    b_idx = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
    h_idx = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None]
    rows = jnp.arange(seq_q, dtype=jnp.int32)[None, None, :, None]
    cols = jnp.arange(seq_k, dtype=jnp.int32)[None, None, None, :]
    if score_fn is not None:
        qpos = rows + q_offset.astype(jnp.int32)[:, None, None, None]
        s = score_fn(s, b_idx, h_idx, qpos, cols).astype(acc)
    allowed = _dense_mask(
        batch,
        num_heads,
        seq_q,
        seq_k,
        mask=mask,
        is_causal=is_causal,
        local_window_size=local_window_size,
        q_offset=q_offset,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids,
        mask_fn=mask_fn,
    )
    # Masked entries never take part: the shift m is the max over allowed scores, and their
    # weights are selected to 0 (no −inf is stored, so autodiff sees no inf − inf). A finite
    # bias, however negative, gives the softmax; a row with no allowed key (or only −inf
    # scores) gives output 0 and lse −inf, with zero gradient.
    # A sink is one more column of every row: its score is the head's sink, its value 0.
    neg = jnp.finfo(acc).min
    m = jnp.maximum(jnp.max(jnp.where(allowed, s, neg), axis=-1, keepdims=True), neg)
    sink = None
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(acc)[None, :, None, None], m.shape)
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)  # finite even when every allowed score is −inf
    w = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - m, 0.0)), 0.0)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink - m)
    seen = denom[..., 0] > 0
    lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, denom[..., 0], 1.0)), -jnp.inf)
    p = w / jnp.where(denom > 0, denom, 1.0)  # (B, N, T, S); all-zero rows for masked rows
    if dropout_rate > 0.0:
        keep = masks.dropout_keep(
            dropout_seed, b_idx, h_idx, rows, cols, dropout_rate, broadcast_dropout
        )
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    p5 = p.reshape(batch, num_kv_heads, groups, seq_q, seq_k).astype(value.dtype)
    # (B, K, G, T, S) x (B, S, K, Hv) -> (B, T, K, G, Hv)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", p5, value, precision=precision, preferred_element_type=acc
    )
    out = out.reshape(batch, seq_q, num_heads, value.shape[-1])
    return out.astype(value.dtype), lse


def reference_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    q_offset: int | Array = 0,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    mask_fn: Callable[..., Array] | None = None,
    score_fn: Callable[..., Array] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    broadcast_dropout: bool = True,
    sinks: Array | None = None,
    return_lse: bool = False,
    precision: Any = None,
    implementation: str | None = None,
    config: Any = None,
) -> Array | tuple[Array, Array]:
    """Dense float32 attention with the full public signature: the oracle for every test.

    Same arguments, mask semantics and fully-masked-row contract as
    `chunkattn.dot_product_attention`; inputs are upcast to float32 (float64 stays float64) and
    the output is returned in that precision, not the input dtype. `implementation` and
    `config` are accepted and ignored so the two functions are interchangeable.

    Example:
        >>> out = chunkattn.reference_attention(q, k, v, is_causal=True)
    """
    del implementation, config
    args = normalize_arguments(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        local_window_size=local_window_size,
        q_offset=q_offset,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        sinks=sinks,
    )
    if args.empty:  # zero-size B, N, T or S: as dot_product_attention (no max over no keys)
        out, lse = args.empty_result()
        dtype = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
        return args.finish(out.astype(dtype), lse, return_lse)
    dtype = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    out, lse = dense_attention(
        args.query.astype(dtype),
        args.key.astype(dtype),
        args.value.astype(dtype),
        None if args.bias is None else args.bias.astype(dtype),
        args.mask,
        scale=args.scale,
        is_causal=is_causal,
        local_window_size=args.local_window_size,
        q_offset=args.q_offset,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        segment_ids=args.segment_ids,
        mask_fn=mask_fn,
        score_fn=score_fn,
        logits_soft_cap=args.logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_seed=args.dropout_seed,
        broadcast_dropout=broadcast_dropout,
        sinks=None if args.sinks is None else args.sinks.astype(dtype),
        precision=jax.lax.Precision.HIGHEST if precision is None else precision,
    )
    return args.finish(out, lse, return_lse)
