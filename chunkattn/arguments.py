"""Normalisation and validation of every public argument, shared by api, reference and decode.

A request is checked once, at the boundary: a malformed argument raises one ValueError naming
the argument and its value or shape. What passes is normalised to 4-D (`Arguments`) with every
default resolved, and the static options are gathered in `Options`. Implementations receive
both and never re-validate.

Integer rules (DESIGN §3, edge rules): sequence lengths stay below 2^29 so that every
difference of two positions fits int32; `q_offset` and lengths are int32; a window bound is at
most 2^31 − 1 (`masks.relative_bounds` adds it to the offset with saturation, so nothing wraps).
Concrete integers that do not fit are refused here; they are never truncated silently.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn import masks
from chunkattn.summary import accum_dtype

Array = jax.Array

IMPLEMENTATIONS = (
    "chunked",
    "pallas",
    "pallas_triton",
    "pallas_mosaic",
    "pallas_tpu",
    "splash",
    "xla",
    "cudnn",
)
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
MAX_SEQ_LEN = 2**29  # positions differ by less than 2^30: no int32 difference can wrap


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
    segment_ids: tuple[Array, Array] | None  # int ([B, T], [B, S]): int32, or int64 under x64
    logits_soft_cap: float | None
    dropout_seed: Array | None  # uint32 [2]
    sinks: Array | None  # float [N]: one logit per query head in every row's denominator
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

    @property
    def empty(self) -> bool:
        """True when the output has no elements or no key exists (zero-size B, N, T or S)."""
        batch, seq_q, num_heads, _ = self.query.shape
        return min(batch, seq_q, num_heads, self.key.shape[1]) == 0

    def empty_result(self) -> tuple[Array, Array]:
        """What a zero-size request returns: output 0 and lse −inf (no row sees a key), or
        lse = the head's sink when sinks are given (a row with no key attends to its sink)."""
        batch, seq_q, num_heads, _ = self.query.shape
        out = jnp.zeros((batch, seq_q, num_heads, self.value.shape[-1]), self.query.dtype)
        adt = accum_dtype(self.query.dtype)
        lse = jnp.full((batch, num_heads, seq_q), -jnp.inf, adt)
        if self.sinks is not None and self.key.shape[1] == 0:
            lse = jnp.broadcast_to(self.sinks.astype(adt)[None, :, None], lse.shape)
        return out, lse

    def finish(
        self, out: Array, lse: Array | None, return_lse: bool
    ) -> Array | tuple[Array, Array]:
        """Undo the normalisation: drop the batch axis of 3-D calls, return lse if asked."""
        if not self.batched:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class Options:
    """The static, non-array options of a request (hashable: it keys the compiled program)."""

    is_causal: bool
    mask_fn: Callable[..., Array] | None
    score_fn: Callable[..., Array] | None
    dropout_rate: float
    broadcast_dropout: bool
    precision: Any
    config: Any


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def is_concrete(x: Any) -> bool:
    """True for a value known while tracing (a Python or NumPy value, or a concrete array)."""
    return not isinstance(x, jax.core.Tracer)


def first_order_only(fn: Callable[..., Any], kernels: str) -> Callable[..., Any]:
    """fn, whose derivative raises a clear error: a pallas_call has no JVP, so a second
    derivative (grad of grad, a Hessian) cannot differentiate the `kernels` named."""
    wrapped = jax.custom_jvp(fn)

    @wrapped.defjvp
    def _no_jvp(primals, tangents):
        del primals, tangents
        raise NotImplementedError(
            f"second-order derivatives (grad of grad, Hessians) are not implemented by the "
            f"{kernels} kernels; use implementation='xla' for them"
        )

    return wrapped


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


def _check_int_range(name: str, x: Any, lo: int, hi: int) -> None:
    """Refuse concrete integers outside [lo, hi] (they would wrap when narrowed to int32)."""
    if not is_concrete(x) or np.size(x) == 0:
        return
    values = np.asarray(x)
    small, large = int(values.min()), int(values.max())
    if small < lo or large > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}] (int32 positions), got {x!r}")


def _int32(name: str, x: Any) -> Array:
    """x as int32: concrete values must fit; traced wider ints saturate (never wrap)."""
    _check_int_range(name, x, INT32_MIN, INT32_MAX)
    x = np.asarray(x) if is_concrete(x) else x
    if jnp.dtype(x.dtype).itemsize > 4 or x.dtype == np.uint32:
        x = jnp.clip(jnp.asarray(x), INT32_MIN, INT32_MAX)
    return jnp.asarray(x).astype(jnp.int32)


def _per_batch_ints(name: str, x: Any, batch: int, batched: bool, *, allow_scalar: bool) -> Array:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
        raise ValueError(f"{name} must be integer, got dtype {dtype} and shape {_shape(x)}")
    shape = _shape(x)
    if shape == () and (allow_scalar or not batched):
        return jnp.broadcast_to(_int32(name, x), (batch,))
    if shape != (batch,):
        want = f"[B]=({batch},)" if batched else "a scalar"
        raise ValueError(f"{name} must be {want}, got {name}.shape={shape}")
    return _int32(name, x)


def _segment_array(name: str, seg: Any) -> Array:
    """Segment ids keep their values exactly: uint32 is reinterpreted as int32 (equality is
    preserved), 64-bit ids stay 64-bit under x64 and must fit int32 without it."""
    dtype = seg.dtype if hasattr(seg, "dtype") else np.asarray(seg).dtype
    if not jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
        raise ValueError(f"segment_ids: {name} must be integer, got dtype {dtype}")
    if jnp.dtype(dtype).itemsize > 4 and not jax.config.jax_enable_x64:
        _check_int_range(f"segment_ids: {name}", seg, INT32_MIN, INT32_MAX)
        return jnp.asarray(np.asarray(seg) if is_concrete(seg) else seg).astype(jnp.int32)
    seg = jnp.asarray(seg)
    if seg.dtype == jnp.uint32:
        return jax.lax.bitcast_convert_type(seg, jnp.int32)
    if seg.dtype.itemsize < 4:
        return seg.astype(jnp.int32)
    return seg


def normalize_segment_ids(
    x: Any, batch: int, seq_q: int, seq_k: int, batched: bool = True
) -> tuple[Array, Array]:
    """(q ids [B, T], kv ids [B, S]) from one array (T == S) or a pair, values kept exactly."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ValueError(
                f"segment_ids must be an array or a pair of arrays, got {len(x)} items"
            )
        q_seg, kv_seg = x
    else:
        q_seg = kv_seg = x
        if seq_q != seq_k:
            raise ValueError(
                "segment_ids given as one array needs T == S; pass (q_segment_ids, kv_segment_ids)"
                f" for T={seq_q}, S={seq_k}; got segment_ids.shape={_shape(x)}"
            )
    out = []
    for name, seg, length in (("q_segment_ids", q_seg, seq_q), ("kv_segment_ids", kv_seg, seq_k)):
        want = (batch, length) if batched else (length,)
        if _shape(seg) != want:
            raise ValueError(f"segment_ids: {name} must have shape {want}, got {_shape(seg)}")
        seg = _segment_array(name, seg)
        out.append(seg.reshape(batch, length))
    if out[0].dtype != out[1].dtype:
        wide = jnp.promote_types(out[0].dtype, out[1].dtype)
        out = [s.astype(wide) for s in out]
    return tuple(out)


def _window_bound(w: Any, original: Any) -> int:
    """One bound of a window: a concrete non-negative integer at most 2^31 − 1."""
    if not is_concrete(w):
        raise ValueError(
            f"local_window_size must be concrete (it is static), got a traced value {original!r}"
        )
    arr = np.asarray(w)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise ValueError(
            "local_window_size must be a non-negative int or a pair (left, right) of ints, "
            f"got {original!r}"
        )
    value = int(arr)
    if not 0 <= value <= INT32_MAX:
        raise ValueError(
            f"local_window_size bounds must lie in [0, {INT32_MAX}] (None means no window), "
            f"got {original!r}"
        )
    return value


def _window(w: Any) -> tuple[int, int] | None:
    if w is None:
        return None
    if not is_concrete(w):
        raise ValueError(f"local_window_size must be concrete (it is static), got {w!r}")
    shape = np.shape(w)
    if shape == ():
        bound = _window_bound(w, w)
        return bound, bound
    if shape != (2,):
        raise ValueError(
            "local_window_size must be a non-negative int or a pair (left, right), "
            f"got {w!r} with shape {shape}"
        )
    pair = tuple(w) if isinstance(w, tuple | list) else tuple(np.asarray(w))
    return _window_bound(pair[0], w), _window_bound(pair[1], w)


def _static_float(name: str, x: Any, hint: str) -> float:
    try:  # static: it selects the compiled program, as the chunk sizes do
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"{name} must be a concrete number (it is static), got {type(x).__name__} with "
            f"shape {jnp.shape(x)}; {hint}"
        ) from None


def _check_user_fn(name: str, fn: Any, example: tuple[Any, ...], target: tuple[int, ...]):
    """Trace a mask_fn/score_fn abstractly on block-shaped index arrays: arity, dtype, shape."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable, got {fn!r}")
    want = "(batch, head, q_pos, k_pos)"
    if name == "score_fn":
        want = "(score, batch, head, q_pos, k_pos)"
    try:
        inspect.signature(fn).bind(*example)
    except TypeError:
        raise ValueError(f"{name} must take {len(example)} arguments {want}, got {fn!r}") from None
    except ValueError:  # no signature (a builtin); the trace below still checks it
        pass
    out = jax.eval_shape(fn, *example)
    if not hasattr(out, "dtype"):
        raise ValueError(f"{name} must return an array, got {type(out).__name__}")
    if name == "mask_fn" and out.dtype != jnp.bool_:
        raise ValueError(
            f"mask_fn must return bool (True = may attend), got dtype {out.dtype}; "
            "compare, e.g. `k_pos <= q_pos`, rather than returning ints"
        )
    if name == "score_fn" and not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"score_fn must return floating-point scores, got dtype {out.dtype}")
    try:
        np.broadcast_shapes(out.shape, target)
        if len(out.shape) > len(target):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{name} must return an array broadcastable to the block {target}, "
            f"got shape {out.shape}"
        ) from None


def index_shapes(batch: int, num_heads: int, tq: int, tk: int) -> tuple[Any, ...]:
    """Abstract (batch, head, query position, key position) index arrays of a block, in the
    broadcastable shapes mask_fn and score_fn receive."""
    i32 = jnp.int32
    return (
        jax.ShapeDtypeStruct((batch, 1, 1, 1), i32),  # batch index
        jax.ShapeDtypeStruct((1, num_heads, 1, 1), i32),  # head index
        jax.ShapeDtypeStruct((batch, 1, tq, 1), i32),  # query position
        jax.ShapeDtypeStruct((1, 1, 1, tk), i32),  # key position
    )


def check_user_functions(
    mask_fn: Any, score_fn: Any, batch: int, num_heads: int, seq_q: int, seq_k: int
) -> None:
    """Validate mask_fn and score_fn on abstract index arrays shaped as the chunked path's."""
    idx = index_shapes(batch, num_heads, seq_q, seq_k)
    target = (batch, num_heads, seq_q, seq_k)
    if mask_fn is not None:
        _check_user_fn("mask_fn", mask_fn, idx, target)
    if score_fn is not None:
        score = jax.ShapeDtypeStruct(target, jnp.float32)
        _check_user_fn("score_fn", score_fn, (score, *idx), target)


def explicit_closure(
    fn: Callable[..., Array] | None, example: tuple[Any, ...]
) -> tuple[Callable[..., Array] | None, tuple[Array, ...]]:
    """fn with the traced values it closes over made explicit arguments (taken last).

    A score_fn or mask_fn may close over values being differentiated (learned ALiBi slopes, a
    relative position table) or traced by `lax.scan`, `jax.checkpoint` or an outer `jit`; the
    chunked custom_vjp must not capture them, so `jax.closure_convert` hoists them into
    operands. The backward differentiates a score_fn's; a mask's get no gradient (boolean).
    """
    if fn is None:
        return None, ()
    converted, params = jax.closure_convert(fn, *example)
    return converted, tuple(jnp.asarray(p) for p in params)


def check_implementation(implementation: Any, config: Any) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if config is not None and not dataclasses.is_dataclass(config):
        raise ValueError(f"config must be a config dataclass such as ChunkConfig, got {config!r}")


def resolve_precision(precision: Any, dtype: Any) -> Any:
    """The user's precision, or HIGHEST for float32/float64 inputs: float32 in, float32
    arithmetic out, no silent TF32 on GPUs (DESIGN §3 numerics)."""
    if precision is None and dtype in (jnp.float32, jnp.float64):
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
    sinks: Any = None,
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
    shapes = f"query.shape={_shape(query)}, key.shape={_shape(key)}, value.shape={_shape(value)}"
    if not batched:
        query, key, value = query[None], key[None], value[None]
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
    if num_kv_heads == 0 and num_heads != 0:
        raise ValueError(f"kv heads K must be positive when N={num_heads}; got {shapes}")
    if num_kv_heads and num_heads % num_kv_heads:
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
        raise ValueError(
            f"query, key and value must be floating point (float32, bfloat16, float16; float64 "
            f"under x64), got {query.dtype}"
        )
    if min(head_dim, value.shape[-1]) == 0:
        raise ValueError(f"head dims H and Hv must be positive; got {shapes}")
    if max(seq_q, seq_k) >= MAX_SEQ_LEN:
        raise ValueError(f"sequence lengths must be below 2^29; got {shapes}")

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
    scale = _static_float("scale", scale, "pass a Python float, or fold a traced scale into query")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if logits_soft_cap is not None:
        logits_soft_cap = _static_float("logits_soft_cap", logits_soft_cap, "pass a Python float")
        if not (logits_soft_cap > 0 and math.isfinite(logits_soft_cap)):
            raise ValueError(
                f"logits_soft_cap must be a positive finite number (None for no cap), "
                f"got {logits_soft_cap!r}"
            )
    dropout_rate = _static_float("dropout_rate", dropout_rate, "pass a Python float")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    seed = None
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key), got None")
        seed = jax.random.bits(dropout_rng, (2,), jnp.uint32)
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        if sinks.shape != (num_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(
                f"sinks must be a float array of shape [N]=({num_heads},), one logit per query "
                f"head, got dtype {sinks.dtype} and sinks.shape={sinks.shape}"
            )
        values = np.asarray(sinks, np.float32) if is_concrete(sinks) else None
        if values is not None and (np.isnan(values).any() or (values == np.inf).any()):
            raise ValueError(f"sinks must not be NaN or +inf (−inf means no sink), got {sinks!r}")
    offset = _per_batch_ints("q_offset", q_offset, batch, batched, allow_scalar=True)
    if is_concrete(q_offset) and np.size(q_offset) and seq_q:
        _check_int_range("q_offset", q_offset, INT32_MIN, INT32_MAX - (seq_q - 1))
    lengths = [
        None if x is None else _per_batch_ints(name, x, batch, batched, allow_scalar=False)
        for name, x in (
            ("query_seq_lengths", query_seq_lengths),
            ("key_value_seq_lengths", key_value_seq_lengths),
        )
    ]
    return Arguments(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=scale,
        local_window_size=_window(local_window_size),
        q_offset=offset,
        query_seq_lengths=lengths[0],
        key_value_seq_lengths=lengths[1],
        segment_ids=None
        if segment_ids is None
        else normalize_segment_ids(segment_ids, batch, seq_q, seq_k, batched),
        logits_soft_cap=logits_soft_cap,
        dropout_seed=seed,
        sinks=sinks,
        batched=batched,
    )


# Arrays are leaves; the Python values that select the compiled program are static.
jax.tree_util.register_dataclass(
    Arguments,
    data_fields=[
        "query",
        "key",
        "value",
        "bias",
        "mask",
        "q_offset",
        "query_seq_lengths",
        "key_value_seq_lengths",
        "segment_ids",
        "dropout_seed",
        "sinks",
    ],
    meta_fields=["scale", "local_window_size", "logits_soft_cap", "batched"],
)
