"""`dot_product_attention`: the one public entry point, its input checks, and the dispatcher.

Every argument is validated here, at the boundary (ValueError naming the argument and its
shape), and normalised to 4-D (`normalize_arguments`). An implementation receives the
normalised `Arguments` and either serves the request or raises NotImplementedError naming the
feature it lacks; `implementation=None` then falls through to the next one in `_auto_order`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn import chunked, masks, reference

Array = jax.Array

IMPLEMENTATIONS = ("chunked", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class Arguments:
    """A validated request, normalised to 4-D ([B, T, N, H]) with every default resolved."""

    query: Array  # [B, T, N, H]
    key: Array  # [B, S, K, H]
    value: Array  # [B, S, K, Hv]
    bias: Array | None  # [b, n, t, s], each dim 1 or full
    mask: Array | None  # bool [b, n, t, s], each dim 1 or full
    scale: float
    local_window_size: tuple[int, int] | None
    q_offset: Array  # int32 [B]
    query_seq_lengths: Array | None  # int32 [B]
    key_value_seq_lengths: Array | None  # int32 [B]
    segment_ids: tuple[Array, Array] | None  # int32 ([B, T], [B, S])
    logits_soft_cap: float | None
    dropout_seed: Array | None  # uint32 [2]
    batched: bool  # False when the caller passed 3-D [T, N, H] arrays

    def mask_arrays(self) -> masks.MaskArrays:
        q_seg, kv_seg = self.segment_ids if self.segment_ids is not None else (None, None)
        return masks.MaskArrays(
            self.q_offset,
            self.query_seq_lengths,
            self.key_value_seq_lengths,
            q_seg,
            kv_seg,
            self.mask,
        )

    def finish(self, out: Array, lse: Array, return_lse: bool) -> Array | tuple[Array, Array]:
        """Undo the normalisation: drop the batch axis of 3-D calls, return lse if asked."""
        if not self.batched:
            out, lse = out[0], lse[0]
        return (out, lse) if return_lse else out


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _broadcast_4d(name: str, x: Any, target: tuple[int, int, int, int], batched: bool) -> Array:
    """Left-pad x to 4-D and check each dim is 1 or the target's ([B, N, T, S])."""
    x = jnp.asarray(x)
    max_ndim = 4 if batched else 3
    want = "[B, N, T, S]" if batched else "[N, T, S]"
    if x.ndim > max_ndim:
        raise ValueError(
            f"{name} must be broadcastable to {want}={target[4 - max_ndim :]}, "
            f"got {name}.shape={x.shape}"
        )
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for size, full in zip(x4.shape, target, strict=True):
        if size not in (1, full):
            raise ValueError(
                f"{name} must be broadcastable to {want}={target[4 - max_ndim :]}, "
                f"got {name}.shape={x.shape}"
            )
    return x4


def _per_batch_ints(name: str, x: Any, batch: int, batched: bool, *, allow_scalar: bool) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer, got dtype {x.dtype} and shape {x.shape}")
    if x.ndim == 0 and (allow_scalar or not batched):
        return jnp.broadcast_to(x.astype(jnp.int32), (batch,))
    if x.shape != (batch,):
        want = f"[B]=({batch},)" if batched else "a scalar"
        raise ValueError(f"{name} must be {want}, got {name}.shape={x.shape}")
    return x.astype(jnp.int32)


def _segment_ids(x: Any, batch: int, seq_q: int, seq_k: int, batched: bool):
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ValueError(
                f"segment_ids must be an array or a pair of arrays, got {len(x)} items"
            )
        q_seg, kv_seg = (jnp.asarray(a) for a in x)
    else:
        q_seg = kv_seg = jnp.asarray(x)
        if seq_q != seq_k:
            raise ValueError(
                "segment_ids given as one array needs T == S; pass (q_segment_ids, kv_segment_ids)"
                f" for T={seq_q}, S={seq_k}; got segment_ids.shape={q_seg.shape}"
            )
    out = []
    for name, seg, length in (("q_segment_ids", q_seg, seq_q), ("kv_segment_ids", kv_seg, seq_k)):
        want = (batch, length) if batched else (length,)
        if seg.shape != want:
            raise ValueError(f"segment_ids: {name} must have shape {want}, got {seg.shape}")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"segment_ids: {name} must be integer, got dtype {seg.dtype}")
        out.append(seg.reshape(batch, length).astype(jnp.int32))
    return tuple(out)


def _window(w: Any) -> tuple[int, int] | None:
    if w is None:
        return None
    pair = (w, w) if isinstance(w, int | np.integer) else tuple(w)
    if len(pair) != 2 or not all(isinstance(a, int | np.integer) and a >= 0 for a in pair):
        raise ValueError(
            f"local_window_size must be a non-negative int or a pair (left, right), got {w!r}"
        )
    return int(pair[0]), int(pair[1])


def resolve_precision(precision: Any, dtype: Any) -> Any:
    """The user's precision, or HIGHEST for float32 inputs: float32 in, float32 arithmetic out,
    no silent TF32 on GPUs (DESIGN §3 numerics)."""
    if precision is None and dtype == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return precision


def normalize_arguments(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    local_window_size: Any = None,
    q_offset: Any = 0,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    segment_ids: Any = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Any = None,
) -> Arguments:
    """Validate a request (ValueError naming the argument and its shape) and normalise it."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if query.ndim not in (3, 4):
        raise ValueError(f"query must be [B, T, N, H] or [T, N, H], got query.shape={query.shape}")
    batched = query.ndim == 4
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name} must have the rank of query ({query.ndim}), got query.shape={query.shape},"
                f" {name}.shape={x.shape}"
            )
    if not batched:
        query, key, value = query[None], key[None], value[None]
    shapes = f"query.shape={_shape(query)}, key.shape={_shape(key)}, value.shape={_shape(value)}"
    if not batched:
        shapes = (
            f"query.shape={_shape(query[0])}, key.shape={_shape(key[0])}, "
            f"value.shape={_shape(value[0])}"
        )
    batch, seq_q, num_heads, head_dim = query.shape
    _, seq_k, num_kv_heads, _ = key.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"query, key and value must share the batch size B; got {shapes}")
    if value.shape[1] != seq_k:
        raise ValueError(f"key and value must share the sequence length S; got {shapes}")
    if key.shape[-1] != head_dim:
        raise ValueError(f"query and key must share the head dim H; got {shapes}")
    if value.shape[2] != num_kv_heads:
        raise ValueError(f"key and value must share the number of kv heads K; got {shapes}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"query heads N={num_heads} must be a multiple of kv heads K={num_kv_heads};"
            f" got {shapes}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype},"
            f" {value.dtype} ({shapes})"
        )
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(f"query, key and value must be floating point, got {query.dtype}")
    if min(seq_q, seq_k, head_dim, value.shape[-1]) == 0:
        raise ValueError(f"sequence lengths and head dims must be positive; got {shapes}")

    target = (batch, num_heads, seq_q, seq_k)
    if bias is not None:
        bias = _broadcast_4d("bias", bias, target, batched)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be floating point, got dtype {bias.dtype}")
    if mask is not None:
        mask = _broadcast_4d("mask", mask, target, batched)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be bool (True = may attend), got dtype {mask.dtype} "
                f"and shape {mask.shape}"
            )
    if scale is None:
        scale = head_dim**-0.5
    try:  # static: it selects the compiled program, as the chunk sizes do
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"scale must be a concrete number (it is static), got {type(scale).__name__} with "
            f"shape {jnp.shape(scale)}; pass a Python float, or fold a traced scale into query"
        ) from None
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    seed = None
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key), got None")
        seed = jax.random.bits(dropout_rng, (2,), jnp.uint32)
    return Arguments(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=scale,
        local_window_size=_window(local_window_size),
        q_offset=_per_batch_ints("q_offset", q_offset, batch, batched, allow_scalar=True),
        query_seq_lengths=None
        if query_seq_lengths is None
        else _per_batch_ints(
            "query_seq_lengths", query_seq_lengths, batch, batched, allow_scalar=False
        ),
        key_value_seq_lengths=None
        if key_value_seq_lengths is None
        else _per_batch_ints(
            "key_value_seq_lengths", key_value_seq_lengths, batch, batched, allow_scalar=False
        ),
        segment_ids=None
        if segment_ids is None
        else _segment_ids(segment_ids, batch, seq_q, seq_k, batched),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_seed=seed,
        batched=batched,
    )


def _pad_axis(x: Array | None, axis: int, size: int, value: Any = 0) -> Array | None:
    """Pad x along axis to `size` (no-op when already that size or when that dim is 1)."""
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _run_chunked(args: Arguments, opts: _Options) -> tuple[Array, Array]:
    config = opts.config if opts.config is not None else chunked.ChunkConfig()
    if not isinstance(config, chunked.ChunkConfig):
        raise NotImplementedError(
            f"the chunked implementation takes a ChunkConfig, got {type(config).__name__}"
        )
    batch, seq_q = args.query.shape[:2]
    seq_k = args.key.shape[1]
    tq, tk = config.resolve(seq_q, seq_k, batch * args.query.shape[2])
    pq, pk = -(-seq_q // tq) * tq, -(-seq_k // tk) * tk
    marr = args.mask_arrays()
    marr = marr._replace(
        q_segment_ids=_pad_axis(marr.q_segment_ids, 1, pq),
        kv_segment_ids=_pad_axis(marr.kv_segment_ids, 1, pk),
        mask=_pad_axis(_pad_axis(marr.mask, 2, pq, False), 3, pk, False),
    )
    bias = _pad_axis(_pad_axis(args.bias, 2, pq), 3, pk)
    score_fn, score_params = _explicit_closure(opts.score_fn, batch, args.query.shape[2], tq, tk)
    st = chunked.Static(
        spec=masks.MaskSpec(opts.is_causal, args.local_window_size, opts.mask_fn),
        scale=args.scale,
        soft_cap=args.logits_soft_cap,
        score_fn=score_fn,
        dropout_rate=opts.dropout_rate,
        broadcast_dropout=opts.broadcast_dropout,
        tq=tq,
        tk=tk,
        seq_k=seq_k,
        precision=opts.precision,
    )
    out, lse = chunked.attention(
        st,
        _pad_axis(args.query, 1, pq),
        _pad_axis(args.key, 1, pk),
        _pad_axis(args.value, 1, pk),
        bias,
        score_params,
        marr,
        args.dropout_seed,
    )
    return out[:, :seq_q], lse[:, :, :seq_q]


def _explicit_closure(
    score_fn: Callable[..., Array] | None, batch: int, num_heads: int, tq: int, tk: int
) -> tuple[Callable[..., Array] | None, tuple[Array, ...]]:
    """score_fn with the float arrays it closes over made explicit arguments.

    A score_fn may close over values being differentiated (learned ALiBi slopes, a relative
    position table); a custom_vjp must not capture them, so `jax.closure_convert` hoists them
    into arguments that the backward pass differentiates like any other input.
    """
    if score_fn is None:
        return None, ()
    i32 = jnp.int32
    example = (
        jax.ShapeDtypeStruct((batch, num_heads, tq, tk), jnp.float32),  # score block
        jax.ShapeDtypeStruct((batch, 1, 1, 1), i32),  # batch index
        jax.ShapeDtypeStruct((1, num_heads, 1, 1), i32),  # head index
        jax.ShapeDtypeStruct((batch, 1, tq, 1), i32),  # query position
        jax.ShapeDtypeStruct((1, 1, 1, tk), i32),  # key position
    )
    converted, params = jax.closure_convert(score_fn, *example)
    return converted, tuple(jnp.asarray(p) for p in params)


def _run_xla(args: Arguments, opts: _Options) -> tuple[Array, Array]:
    return reference.dense_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        scale=args.scale,
        is_causal=opts.is_causal,
        local_window_size=args.local_window_size,
        q_offset=args.q_offset,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        segment_ids=args.segment_ids,
        mask_fn=opts.mask_fn,
        score_fn=opts.score_fn,
        logits_soft_cap=args.logits_soft_cap,
        dropout_rate=opts.dropout_rate,
        dropout_seed=args.dropout_seed,
        broadcast_dropout=opts.broadcast_dropout,
        precision=opts.precision,
    )


def _run_pallas(args: Arguments, opts: _Options) -> tuple[Array, Array]:
    from chunkattn import pallas  # imported lazily: never at package import

    return pallas.attention(args, opts)  # NotImplementedError off GPU unless interpreting


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static, non-array options of a request."""

    is_causal: bool
    mask_fn: Callable[..., Array] | None
    score_fn: Callable[..., Array] | None
    dropout_rate: float
    broadcast_dropout: bool
    precision: Any
    config: Any


_RUNNERS: dict[str, Callable[[Arguments, _Options], tuple[Array, Array]]] = {
    "chunked": _run_chunked,
    "pallas": _run_pallas,
    "xla": _run_xla,
}


def _auto_order() -> Sequence[str]:
    """Fastest first; each may decline with NotImplementedError."""
    if jax.default_backend() == "gpu":
        return ("pallas", "chunked")
    return ("chunked",)


def dot_product_attention(
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
    return_lse: bool = False,
    precision: Any = None,
    implementation: str | None = None,
    config: Any = None,
) -> Array | tuple[Array, Array]:
    """Exact scaled dot-product attention in memory linear in the sequence length.

    Shapes: B batch, T query length, S key length, N query heads, K kv heads (K divides N),
    H head dim, Hv value head dim. 3-D inputs ([T, N, H]) are accepted and give 3-D outputs.

    Args:
      query: [B, T, N, H]. key: [B, S, K, H]. value: [B, S, K, Hv]. Same float dtype
        (float32, bfloat16, float16); scores and sums are float32, the output is in that dtype.
      bias: float, broadcastable to [B, N, T, S]; added to the scores; differentiable (its
        gradient has the bias's own shape). Sliced per chunk, never broadcast to [T, S].
      mask: bool, broadcastable to [B, N, T, S]; True = may attend.
      scale: multiplies q·kᵀ; default 1/√H.
      is_causal: query i sees key j iff j ≤ i + q_offset (top-left aligned).
      local_window_size: w or (left, right): query i sees keys i+q_offset−left … i+q_offset+right.
      q_offset: int or int [B]: position of query 0 in the key sequence (decoding with a cache).
      query_seq_lengths, key_value_seq_lengths: int [B]: queries/keys at or past these are padding.
      segment_ids: int [B, T] (self-attention) or ([B, T], [B, S]); only equal ids attend.
      mask_fn: (batch, head, q_pos, k_pos) -> bool, evaluated per chunk on broadcastable int32
        index arrays ([B,1,1,1], [1,N,1,1], [B,1,tq,1], [1,1,1,tk]); must be elementwise.
      score_fn: (score, batch, head, q_pos, k_pos) -> score on a float32 [B, N, tq, tk] block;
        must be elementwise. Applied after the soft cap and bias, before the masks.
      logits_soft_cap: scores become cap·tanh(s/cap) (before the bias).
      dropout_rate, dropout_rng, broadcast_dropout: dropout on the attention weights; the mask
        is a hash of (key, position), identical in the backward pass and for any chunking;
        with broadcast_dropout it is shared across batch and heads.
      return_lse: also return the log-sum-exp, float32 [B, N, T] (−inf for rows seeing no key).
      precision: passed to the matrix products; None means HIGHEST for float32 inputs (no
        TF32 on GPUs) and the backend default otherwise.
      implementation: None (fastest available), "chunked" (pure JAX, every backend), "pallas"
        (fused GPU kernels) or "xla" (dense).
      config: the implementation's config, e.g. `ChunkConfig(q_chunk_size=..., kv_chunk_size=...)`.

    Returns:
      [B, T, N, Hv] in the input dtype, or (out, lse) with return_lse. A query that may attend no
      key gets output 0, lse −inf and zero gradient.

    Raises:
      ValueError: a malformed argument (the message names it and its shape).
      NotImplementedError: the named implementation cannot serve this request.

    Example:
        >>> q = k = v = jnp.ones((2, 4096, 8, 64), jnp.bfloat16)
        >>> out = chunkattn.dot_product_attention(q, k, v, is_causal=True)
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if config is not None and not dataclasses.is_dataclass(config):
        raise ValueError(f"config must be a config dataclass such as ChunkConfig, got {config!r}")
    for name, fn in (("mask_fn", mask_fn), ("score_fn", score_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
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
    )
    precision = resolve_precision(precision, args.query.dtype)
    opts = _Options(
        is_causal=bool(is_causal),
        mask_fn=mask_fn,
        score_fn=score_fn,
        dropout_rate=float(dropout_rate),
        broadcast_dropout=bool(broadcast_dropout),
        precision=precision,
        config=config,
    )
    names = (implementation,) if implementation is not None else _auto_order()
    errors = []
    for name in names:
        try:
            out, lse = _RUNNERS[name](args, opts)
            return args.finish(out, lse, return_lse)
        except NotImplementedError as e:
            if implementation is not None:
                raise
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no implementation can serve this request: " + "; ".join(errors))
