"""Decoding: a few new queries against a KV cache, split over the cache (flash-decoding).

A decode step has T = 1 (or a few) queries and a cache of L keys. The chunked core would loop
over the cache one small chunk after another, each step a [N·T, H] × [H, tk] product too small
to fill a GPU. Here the cache is split into chunks of `chunk_size` keys; a wave of `num_splits`
consecutive chunks is summarised in parallel (`summary.summarize`, vmapped over the chunk axis),
the wave's summaries are reduced by the log-sum-exp merge (`summary.merge_stacked`), and waves are
merged into the running summary. The loop over waves runs only over the chunks a query can see
(`masks.kv_chunk_range`: below the longest filled length, inside the causal bound and the
window), so waves past them are never read; inside the last wave, keys past a row's own length
are read and masked (they must be finite: `KVCache.empty` fills zeros). Memory: one wave of
B·N·T·num_splits·chunk_size float32 scores, whatever L is.

The step is forward only (inference); training goes through `dot_product_attention`.

Cache lengths are checked, never trusted: concrete ones outside [0, L] raise ValueError; traced
ones (under jit) are checked by `require`, which reports through `jax.experimental.checkify`
when the caller asks for it, and otherwise the rows they concern come back NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from chunkattn import masks
from chunkattn.arguments import normalize_arguments, resolve_precision
from chunkattn.summary import (
    ChunkSummary,
    accum_dtype,
    merge,
    merge_stacked,
    row_start,
    summarize,
)

Array = jax.Array

# GPU: float32 score elements per wave (B·N·T·num_splits·chunk_size), 64 MiB; and keys per
# wave, so that a short fill or a window still skips most of a long cache.
_GPU_WAVE_ELEMENTS = 2**24
_GPU_WAVE_KEYS = 16384


def require(ok: Array | bool, message: str, **values: Array | int) -> bool | None:
    """Check a condition on argument values: ValueError now if concrete, a checkify check if not.

    Concrete `ok` (eager calls, Python values): raises `ValueError(message.format(**values))`
    when any element of `ok` is False. Traced `ok` (under `jax.jit`, `lax.scan`, `vmap`...):
    emits `checkify.debug_check(all(ok), message, **values)`, a no-op unless the caller is
    transformed by `checkify.checkify(f, errors=checkify.user_checks)`, which then returns the
    error with the traced values formatted in. Returns the concrete verdict (True), or None
    when traced, so the caller can guard the unchecked case (for instance with NaN outputs).

    Example:
        >>> require(n <= size, "cache_lengths={n} exceeds the cache's {size} positions",
        ...         n=n, size=size)
    """
    ok = jnp.all(jnp.asarray(ok))
    try:
        concrete = bool(ok)
    except jax.errors.ConcretizationTypeError:
        checkify.debug_check(ok, message, **{k: jnp.asarray(v) for k, v in values.items()})
        return None
    if not concrete:
        raise ValueError(message.format(**{k: np.asarray(v).tolist() for k, v in values.items()}))
    return True


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How `decode_attention` splits the cache (None: from the shapes and the backend).

    chunk_size: keys per chunk (default 512, clipped to the cache). num_splits: chunks
    summarised in parallel per wave. Default on GPU: as many as fit B·N·T·num_splits·chunk_size
    ≤ 2^24 float32 scores in a wave of ≤ 16384 keys (so a short fill or a window still skips
    most of a long cache); on CPU: 1, because XLA:CPU's product over a [B, S, K, H] cache slice
    slows down more than linearly past ~512 keys (bench/NOTES.md, decode), so a CPU decode step
    is the chunked loop. Never more than the cache holds.
    """

    chunk_size: int | None = None
    num_splits: int | None = None

    def __post_init__(self):
        for name in ("chunk_size", "num_splits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"DecodeConfig.{name} must be a positive int or None, got {v!r}")

    def resolve(self, rows: int, cache_len: int, backend: str | None = None) -> tuple[int, int]:
        """Concrete (chunk_size, num_splits) for B·N·T = `rows` score rows and a cache of L."""
        chunk = min(self.chunk_size or 512, cache_len)
        splits = self.num_splits
        if splits is None:
            gpu = (backend or jax.default_backend()) == "gpu"
            budget = min(_GPU_WAVE_ELEMENTS // rows, _GPU_WAVE_KEYS)  # keys per wave
            splits = max(1, budget // chunk) if gpu else 1
        return chunk, max(1, min(splits, cache_len // chunk))  # a wave fits inside the cache


def decode_attention(
    query: Array,
    key: Array,
    value: Array,
    cache_lengths: Array | int,
    *,
    q_offset: Array | int | None = None,
    is_causal: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sinks: Array | None = None,
    return_lse: bool = False,
    precision: Any = None,
    config: DecodeConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Attention of a few new queries over the filled part of a KV cache.

    Args:
      query: [B, T, N, H], the new tokens' queries (T small: 1 for a decode step).
      key: the key cache [B, L, K, H]; value: the value cache [B, L, K, Hv], K dividing N.
        Waves of chunks past the longest length are never read; keys past a row's length
        inside a read wave are masked and must be finite.
      cache_lengths: int or [B], filled positions, the new tokens' keys included; each in
        [0, L]. Concrete lengths outside it raise ValueError. Traced lengths (under jit) are
        checked by `checkify`: run the step as `checkify.checkify(step,
        errors=checkify.user_checks)` to get the error; unchecked, the rows of a batch entry
        whose length is outside [0, L] come back NaN (never a silently wrong number).
      q_offset: int or [B], sequence position of query row 0; default `cache_lengths − T`
        (the queries are the last T filled positions).
      is_causal, local_window_size, scale, logits_soft_cap, sinks: as `dot_product_attention`
        (a sink [N] joins every row's denominator; a row that sees no key gives 0).
      return_lse: also return the log-sum-exp [B, N, T] (to merge with attention elsewhere).
      precision: of the matrix products; None means HIGHEST for float32 inputs (no TF32).
      config: a `DecodeConfig` (chunk size and splits).

    Returns:
      [B, T, N, Hv] in the query's dtype (and lse if asked); a row that sees no key gives 0.

    Example:
        >>> cache_k = cache_k.at[:, length].set(k_new[:, 0])   # write the new token
        >>> cache_v = cache_v.at[:, length].set(v_new[:, 0])
        >>> y = decode_attention(q_new, cache_k, cache_v, length + 1)   # (B, 1, N, H)
    """
    config = config if config is not None else DecodeConfig()
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig, got {config!r}")
    query = jnp.asarray(query)
    if query.ndim != 4:
        raise ValueError(f"query must be [B, T, N, H], got query.shape={jnp.shape(query)}")
    batch, seq_q = query.shape[:2]
    lengths = jnp.asarray(cache_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape not in ((), (batch,)):
        raise ValueError(
            f"cache_lengths must be an int or [B]=({batch},) integers, got dtype "
            f"{lengths.dtype} and cache_lengths.shape={lengths.shape}"
        )
    cache_len = np.shape(key)[1] if np.ndim(key) == 4 else None
    in_range, valid = None, True
    if cache_len is not None:  # a malformed key is reported by normalize_arguments below
        in_range = (lengths >= 0) & (lengths <= cache_len)  # compared before any cast: no wrap
        valid = require(
            in_range,
            f"cache_lengths={{cache_lengths}} must lie in [0, L={cache_len}], the cache's "
            f"positions (key.shape={np.shape(key)})",
            cache_lengths=lengths,
        )
        lengths = jnp.clip(lengths, 0, cache_len)
    lengths = jnp.broadcast_to(lengths.astype(jnp.int32), (batch,))
    if q_offset is None:
        q_offset = lengths - seq_q
    args = normalize_arguments(
        query,
        key,
        value,
        scale=scale,
        local_window_size=local_window_size,
        q_offset=q_offset,
        key_value_seq_lengths=lengths,
        logits_soft_cap=logits_soft_cap,
        sinks=sinks,
    )
    num_heads = args.query.shape[2]
    precision = resolve_precision(precision, args.query.dtype)
    chunk, splits = config.resolve(batch * num_heads * seq_q, args.key.shape[1])
    spec = masks.MaskSpec(is_causal, args.local_window_size)
    out, lse = _decode(
        args.query,
        args.key,
        args.value,
        args.mask_arrays(),
        args.sinks,
        spec,
        args.scale,
        args.logits_soft_cap,
        chunk,
        splits,
        precision,
    )
    if in_range is not None and valid is None:  # traced lengths, unchecked: poison bad rows
        bad = ~jnp.broadcast_to(in_range, (batch,))
        out = jnp.where(bad[:, None, None, None], jnp.nan, out)
        lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    return (out, lse) if return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(5, 11)))
def _decode(q, k, v, arrays, sinks, spec, scale, soft_cap, chunk, splits, precision):
    return _decode_impl(q, k, v, arrays, sinks, spec, scale, soft_cap, chunk, splits, precision)


def _decode_impl(q, k, v, arrays, sinks, spec, scale, soft_cap, chunk, splits, precision):
    batch, seq_q, num_heads, _ = q.shape
    cache_len, head_dim_v = k.shape[1], v.shape[-1]
    wave = chunk * splits  # ≤ cache_len (DecodeConfig.resolve)
    num_chunks = -(-cache_len // chunk)
    lo, hi = masks.kv_chunk_range(spec, arrays, 0, seq_q, chunk, num_chunks)

    def body(i, acc: ChunkSummary) -> ChunkSummary:
        start = (lo + i * splits) * chunk  # the wave's first key
        at = jnp.minimum(start, cache_len - wave)  # a last wave past the end slides back
        kw = jax.lax.dynamic_slice_in_dim(k, at, wave, axis=1)  # (B, W·c, K, H)
        vw = jax.lax.dynamic_slice_in_dim(v, at, wave, axis=1)  # (B, W·c, K, Hv)
        allowed = masks.block_mask(
            spec,
            arrays,
            q_start=0,
            k_start=at,
            tq=seq_q,
            tk=wave,
            num_heads=num_heads,
            seq_k=cache_len,
            padded_seq_k=cache_len,
        )
        cols = at + jnp.arange(wave, dtype=jnp.int32)
        fresh = (cols >= start)[None, None, None, :]  # keys before `start`: an earlier wave's
        allowed = fresh if allowed is None else allowed & fresh
        allowed = jnp.broadcast_to(allowed, (batch, num_heads, seq_q, wave))

        def one_chunk(kc, vc, mc):  # (B, c, K, H), (B, c, K, Hv), (B, N, T, c)
            return summarize(
                q, kc, vc, scale=scale, mask=mc, logits_soft_cap=soft_cap, precision=precision
            )

        if splits == 1:  # one chunk per wave (the CPU default): no chunk axis to reduce
            return merge(acc, one_chunk(kw, vw, allowed))
        per_chunk = jax.vmap(
            one_chunk, in_axes=(1, 1, 3)
        )(
            kw.reshape(batch, splits, chunk, *kw.shape[2:]),  # (B, W, c, K, H)
            vw.reshape(batch, splits, chunk, *vw.shape[2:]),
            allowed.reshape(batch, num_heads, seq_q, splits, chunk),  # (B, N, T, W, c)
        )  # ChunkSummary with a leading W axis
        return merge(acc, merge_stacked(per_chunk))

    waves = -(-(hi - lo) // splits)
    adt = accum_dtype(q.dtype)
    init = row_start(sinks, batch, num_heads, seq_q, head_dim_v, adt)  # a sink: merged once
    acc = jax.lax.fori_loop(0, waves, body, init)
    return acc.output(q.dtype), acc.lse()


def _decode_fwd(q, k, v, arrays, sinks, spec, scale, soft_cap, chunk, splits, precision):
    out = _decode_impl(q, k, v, arrays, sinks, spec, scale, soft_cap, chunk, splits, precision)
    return out, None


def _decode_bwd(spec, scale, soft_cap, chunk, splits, precision, res, cotangents):
    raise NotImplementedError(
        "gradients of decode_attention (it serves inference); differentiate "
        "chunkattn.dot_product_attention with q_offset and key_value_seq_lengths instead"
    )


_decode.defvjp(_decode_fwd, _decode_bwd)
