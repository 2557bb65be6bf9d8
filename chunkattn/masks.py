"""Mask and bias specs, evaluated one chunk at a time: never materialised at [T, S].

A request's masking splits into a static part (`MaskSpec`: causal, window, mask_fn; hashable,
so it can be a `nondiff_argnums` entry) and array parts (`MaskArrays`: q_offset, lengths,
segment ids, a user's dense mask in its own broadcast shape). From them this module gives:

- `block_mask`: the boolean predicate of one (query chunk, key chunk) block, shape
  broadcastable to [B, N, tq, tk], or None when nothing in the block can be masked;
- `kv_chunk_range` / `q_chunk_range`: the key chunks a query chunk can see, and the query
  chunks that can see a key chunk. Blocks outside these ranges are empty (causal, window,
  lengths, segment ids) and never computed;
- `slice_block` / `add_block`: a dense [b, n, t, s] mask/bias/bias-gradient's block, with size-1
  dimensions kept at size 1 (a bias of shape [1, N, 1, S] stays that size);
- `dropout_keep`: a counter-based hash of (seed, batch, head, query row, key column), so a
  dropout mask depends on positions only: the backward pass, the reference and every chunking
  draw the same mask.

Positions: a query row r (0-based in the query array) sits at sequence position
r + q_offset[b]; causal and window compare that position with the key position.

Blocks of a larger problem (the public block contract of `chunked`, used by ring attention):
`q_base` and `k_base` are the global indices of the arrays' first query row and first key, so a
local row r is global row q_base + r and a local key c is global key k_base + c. Positions,
lengths and the dropout hash are then those of the whole problem; segment ids and a dense mask
are the block's own slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static (hashable) part of a mask request."""

    is_causal: bool = False
    window: tuple[int, int] | None = None  # (left, right), both >= 0
    mask_fn: Callable[..., Array] | None = None  # (batch, head, q_pos, k_pos) -> bool


class MaskArrays(NamedTuple):
    """The array part of a mask request (fields may be None)."""

    q_offset: Array  # int32 [B]
    q_lengths: Array | None = None  # int32 [B]
    kv_lengths: Array | None = None  # int32 [B]
    q_segment_ids: Array | None = None  # int32 [B, T]
    kv_segment_ids: Array | None = None  # int32 [B, S]
    mask: Array | None = None  # bool [b, n, t, s], each dim 1 or full
    mask_params: tuple[Array, ...] = ()  # arrays a closure-converted mask_fn takes last
    q_base: Array | None = None  # int32 []: global index of query row 0 (None: 0)
    k_base: Array | None = None  # int32 []: global index of key 0 (None: 0)


def bases(arrays: MaskArrays) -> tuple[Array, Array]:
    """(q_base, k_base) as int32 scalars: where the block sits in the whole problem."""
    q = jnp.int32(0) if arrays.q_base is None else jnp.asarray(arrays.q_base, jnp.int32)
    k = jnp.int32(0) if arrays.k_base is None else jnp.asarray(arrays.k_base, jnp.int32)
    return q, k


def _positions(start: Array | int, size: int) -> Array:
    return start + jnp.arange(size, dtype=jnp.int32)


# Relative bounds are clipped to ±2^30: sequence lengths stay below 2^29 (arguments.py), so
# every key − row difference lies well inside, and row ± bound never leaves int32.
REL_LIMIT = 2**30
_I32_MAX, _I32_MIN = 2**31 - 1, -(2**31)


def relative_bounds(spec: MaskSpec, q_offset: Array) -> tuple[Array, Array]:
    """(lo, hi), int32 [B]: causal and window allow key j for query row r iff lo ≤ j − r ≤ hi.

    Query row r sits at position r + q_offset, so causal means j − r ≤ q_offset and a window
    (left, right) means q_offset − left ≤ j − r ≤ q_offset + right. The sums saturate instead
    of wrapping (a window of 2^31 − 1 means "no limit" at any offset) and are clipped to
    ±REL_LIMIT, which changes no comparison with a key − row difference.
    """
    off = q_offset.astype(jnp.int32)
    lo = jnp.full(off.shape, -REL_LIMIT, jnp.int32)
    hi = jnp.full(off.shape, REL_LIMIT, jnp.int32)
    if spec.is_causal:
        hi = jnp.minimum(hi, off)
    if spec.window is not None:
        left, right = spec.window
        up = jnp.where(off > _I32_MAX - right, _I32_MAX, off + jnp.int32(right))
        down = jnp.where(off < _I32_MIN + left, _I32_MIN, off - jnp.int32(left))
        hi = jnp.minimum(hi, up)
        lo = jnp.maximum(lo, down)
    return jnp.clip(lo, -REL_LIMIT, REL_LIMIT), jnp.clip(hi, -REL_LIMIT, REL_LIMIT)


def block_relative_bounds(spec: MaskSpec, arrays: MaskArrays) -> tuple[Array, Array]:
    """`relative_bounds` in the block's local indices: local key c and local row r are
    allowed iff lo ≤ c − r ≤ hi (global key − row = local key − row + k_base − q_base)."""
    lo, hi = relative_bounds(spec, arrays.q_offset)
    if arrays.q_base is None and arrays.k_base is None:
        return lo, hi
    q_base, k_base = bases(arrays)
    shift = k_base - q_base  # |shift| < 2^29: bounds within ±2^30 stay inside int32
    return lo - shift, hi - shift


def _has_bounds(spec: MaskSpec) -> bool:
    return spec.is_causal or spec.window is not None


def _starts(q_start: Array | int, k_start: Array | int) -> tuple[Array, ...]:
    """dynamic_slice starts of a [b, n, t, s] block, all int32 (also under x64)."""
    return tuple(jnp.asarray(x).astype(jnp.int32) for x in (0, 0, q_start, k_start))


def slice_block(x: Array, q_start: Array | int, k_start: Array | int, tq: int, tk: int) -> Array:
    """Block [b, n, tq|1, tk|1] of a [b, n, t, s] array whose t, s are each 1 or full."""
    t_full, s_full = x.shape[2] != 1, x.shape[3] != 1  # size-1 dims broadcast: never sliced
    starts = _starts(q_start if t_full else 0, k_start if s_full else 0)
    sizes = (x.shape[0], x.shape[1], tq if t_full else 1, tk if s_full else 1)
    return jax.lax.dynamic_slice(x, starts, sizes)


def reduce_block(ds: Array, like_shape: tuple[int, ...]) -> Array:
    """Sum a [B, N, tq, tk] block over the dims where a [b, n, t, s] array has size 1."""
    axes = tuple(i for i, n in enumerate(like_shape) if n == 1 and ds.shape[i] != 1)
    return jnp.sum(ds, axis=axes, keepdims=True) if axes else ds


def add_block(buf: Array, blk: Array, q_start: Array | int, k_start: Array | int) -> Array:
    """buf[block] += reduce(blk): accumulate a [B, N, tq, tk] block into a [b, n, t, s] buffer."""
    tq, tk = blk.shape[2], blk.shape[3]
    blk = reduce_block(
        blk,
        (
            buf.shape[0],
            buf.shape[1],
            1 if buf.shape[2] == 1 else tq,
            1 if buf.shape[3] == 1 else tk,
        ),
    )
    starts = _starts(q_start if buf.shape[2] != 1 else 0, k_start if buf.shape[3] != 1 else 0)
    old = jax.lax.dynamic_slice(buf, starts, blk.shape)
    return jax.lax.dynamic_update_slice(buf, old + blk.astype(buf.dtype), starts)


def block_mask(
    spec: MaskSpec,
    arrays: MaskArrays,
    *,
    q_start: Array | int,
    k_start: Array | int,
    tq: int,
    tk: int,
    num_heads: int,
    seq_k: int,
    padded_seq_k: int,
) -> Array | None:
    """Predicate of one block, broadcastable to [B, N, tq, tk]; None when nothing is masked."""
    rows = _positions(q_start, tq)[None, None, :, None]  # (1, 1, tq, 1), local
    cols = _positions(k_start, tk)[None, None, None, :]  # (1, 1, 1, tk), local
    q_base, k_base = bases(arrays)
    qpos = rows + q_base + arrays.q_offset[:, None, None, None]  # (B, 1, tq, 1)
    conds: list[Array] = []
    if padded_seq_k != seq_k:
        conds.append(cols < seq_k)
    if _has_bounds(spec):
        lo, hi = block_relative_bounds(spec, arrays)
        rel = cols - rows  # (1, 1, tq, tk): local key − row, small
        if spec.window is not None:
            conds.append(rel >= lo[:, None, None, None])
        conds.append(rel <= hi[:, None, None, None])
    if arrays.q_lengths is not None:
        conds.append(rows + q_base < arrays.q_lengths[:, None, None, None])
    if arrays.kv_lengths is not None:
        conds.append(cols + k_base < arrays.kv_lengths[:, None, None, None])
    if arrays.q_segment_ids is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(arrays.q_segment_ids, q_start, tq, axis=1)
        kv_seg = jax.lax.dynamic_slice_in_dim(arrays.kv_segment_ids, k_start, tk, axis=1)
        conds.append(q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    if arrays.mask is not None:
        conds.append(slice_block(arrays.mask, q_start, k_start, tq, tk))
    if spec.mask_fn is not None:
        batch = arrays.q_offset.shape[0]
        b_idx = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
        h_idx = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None]
        conds.append(spec.mask_fn(b_idx, h_idx, qpos, cols + k_base, *arrays.mask_params))
    if not conds:
        return None
    out = conds[0]
    for c in conds[1:]:
        out = out & c
    return out


def pad_segment_ids(ids: Array | None, size: int) -> Array | None:
    """Segment ids [B, L] padded to [B, size] by repeating each row's last id.

    A padded chunk's id span [min, max] then stays its last document's, so the per-chunk
    segment ranges stay tight (a constant such as 0 would stretch the last chunk's span over
    every document). Padding keys are masked by position and padding rows are dropped, so the
    padded ids never decide an output.
    """
    if ids is None or ids.shape[1] == size:
        return ids
    return jnp.pad(ids, ((0, 0), (0, size - ids.shape[1])), mode="edge")


def _ceil_div(a: Array, b: int) -> Array:
    return -(-a // b)


def segment_ranges_meet(ids: Array, other_ids: Array, chunk: int) -> Array:
    """bool [n]: which chunks of `other_ids` can hold an id equal to one in `ids`.

    ids is one chunk's segment ids [B, t]; other_ids [B, n·chunk] is the other side's, cut into
    n chunks. Chunk c can only hold an equal id if, for some batch entry, its id range
    [min, max] meets the range of `ids`: exact for any ids (a chunk that fails the test holds
    no equal pair), and tight for packed documents (non-decreasing ids), whose chunks that meet
    are consecutive.
    """
    batch, length = other_ids.shape
    assert length % chunk == 0, (other_ids.shape, chunk)  # padded to whole chunks by the caller
    other = other_ids.reshape(batch, length // chunk, chunk)  # (B, n, chunk)
    lo, hi = jnp.min(ids, axis=1), jnp.max(ids, axis=1)  # (B,)
    meets = (jnp.min(other, axis=2) <= hi[:, None]) & (jnp.max(other, axis=2) >= lo[:, None])
    return jnp.any(meets, axis=0)  # (n,)


def _narrow(meets: Array, lo: Array, hi: Array) -> tuple[Array, Array]:
    """[lo, hi) narrowed to [first, last] chunk that `meets` (empty when none does)."""
    n = meets.shape[0]
    first = jnp.argmax(meets).astype(jnp.int32)  # argmax of bool: the first True
    last = n - jnp.argmax(meets[::-1]).astype(jnp.int32)  # one past the last True
    lo = jnp.maximum(lo, first)
    hi = jnp.where(jnp.any(meets), jnp.minimum(hi, last), lo)
    return lo, hi


def kv_chunk_range(
    spec: MaskSpec,
    arrays: MaskArrays,
    q_start: Array | int,
    tq: int,
    tk: int,
    num_kv_chunks: int,
) -> tuple[Array, Array]:
    """[lo, hi): the key chunks that query rows [q_start, q_start + tq) can attend to."""
    lo = jnp.int32(0)
    hi = jnp.int32(num_kv_chunks)
    q_base, k_base = bases(arrays)
    if _has_bounds(spec):  # keys j − r ∈ [rel_lo, rel_hi] for some row r of the chunk
        rel_lo, rel_hi = block_relative_bounds(spec, arrays)
        hi = jnp.minimum(hi, _ceil_div(jnp.maximum(q_start + tq + jnp.max(rel_hi), 0), tk))
        lo = jnp.maximum(lo, jnp.maximum(q_start + jnp.min(rel_lo), 0) // tk)
    if arrays.kv_lengths is not None:
        longest = jnp.maximum(jnp.max(arrays.kv_lengths), 0)  # ≥ 0: the difference cannot wrap
        hi = jnp.minimum(hi, _ceil_div(jnp.maximum(longest - k_base, 0), tk))
    if arrays.q_lengths is not None:  # a chunk of padding queries needs no keys
        hi = jnp.where(q_start + q_base < jnp.max(arrays.q_lengths), hi, lo)
    if arrays.q_segment_ids is not None:
        q_ids = jax.lax.dynamic_slice_in_dim(arrays.q_segment_ids, q_start, tq, axis=1)
        meets = segment_ranges_meet(q_ids, arrays.kv_segment_ids, tk)
        lo, hi = _narrow(meets, lo, hi)
    hi = jnp.maximum(hi, lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def q_chunk_range(
    spec: MaskSpec,
    arrays: MaskArrays,
    k_start: Array | int,
    tq: int,
    tk: int,
    num_q_chunks: int,
) -> tuple[Array, Array]:
    """[lo, hi): the query chunks that can attend to key columns [k_start, k_start + tk)."""
    lo = jnp.int32(0)
    hi = jnp.int32(num_q_chunks)
    q_base, k_base = bases(arrays)
    if _has_bounds(spec):  # rows r ∈ [j − rel_hi, j − rel_lo] for some key j of the chunk
        rel_lo, rel_hi = block_relative_bounds(spec, arrays)
        lo = jnp.maximum(lo, jnp.maximum(k_start - jnp.max(rel_hi), 0) // tq)
        hi = jnp.minimum(hi, _ceil_div(jnp.maximum(k_start + tk - jnp.min(rel_lo), 0), tq))
    if arrays.q_lengths is not None:
        longest = jnp.maximum(jnp.max(arrays.q_lengths), 0)  # ≥ 0: the difference cannot wrap
        hi = jnp.minimum(hi, _ceil_div(jnp.maximum(longest - q_base, 0), tq))
    if arrays.kv_lengths is not None:  # a chunk of padding keys is seen by no query
        hi = jnp.where(k_start + k_base < jnp.max(arrays.kv_lengths), hi, lo)
    if arrays.kv_segment_ids is not None:
        kv_ids = jax.lax.dynamic_slice_in_dim(arrays.kv_segment_ids, k_start, tk, axis=1)
        meets = segment_ranges_meet(kv_ids, arrays.q_segment_ids, tq)
        lo, hi = _narrow(meets, lo, hi)
    hi = jnp.maximum(hi, lo)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def index_only(spec: MaskSpec, arrays: MaskArrays) -> bool:
    """True when the mask is a function of positions alone (causal, window, key padding).

    Then a block can be classified as full from its bounds, and full blocks skip the mask.
    """
    return (
        spec.mask_fn is None
        and arrays.q_lengths is None
        and arrays.kv_lengths is None
        and arrays.q_segment_ids is None
        and arrays.mask is None
    )


def _clip_range(flo: Array, fhi: Array, lo: Array, hi: Array) -> tuple[Array, Array]:
    flo = jnp.clip(flo, lo, hi)
    return flo.astype(jnp.int32), jnp.clip(fhi, flo, hi).astype(jnp.int32)


def kv_full_range(
    spec: MaskSpec,
    arrays: MaskArrays,
    q_start: Array | int,
    tq: int,
    tk: int,
    lo: Array,
    hi: Array,
    last_chunk_padded: bool,
) -> tuple[Array, Array]:
    """[flo, fhi) within [lo, hi): key chunks every query row of the chunk sees entirely.

    Only meaningful when `index_only(spec, arrays)`; the last key chunk holds padding keys
    when `last_chunk_padded` and is never full.
    """
    flo, fhi = lo, hi
    if last_chunk_padded:
        fhi = jnp.minimum(fhi, hi - 1)
    if _has_bounds(spec):  # j·tk − r_last ≥ max rel_lo and (j+1)·tk − 1 − r_first ≤ min rel_hi
        rel_lo, rel_hi = block_relative_bounds(spec, arrays)
        flo = jnp.maximum(flo, _ceil_div(q_start + tq - 1 + jnp.max(rel_lo), tk))
        fhi = jnp.minimum(fhi, jnp.floor_divide(q_start + jnp.min(rel_hi) + 1, tk))
    return _clip_range(flo, fhi, lo, hi)


def q_full_range(
    spec: MaskSpec,
    arrays: MaskArrays,
    k_start: Array | int,
    tq: int,
    tk: int,
    lo: Array,
    hi: Array,
    chunk_padded: Array | bool,
) -> tuple[Array, Array]:
    """[flo, fhi) within [lo, hi): query chunks that see key chunk [k_start, k_start + tk) whole.

    Only meaningful when `index_only(spec, arrays)`; a key chunk holding padding keys
    (`chunk_padded`) has no full blocks.
    """
    flo, fhi = lo, jnp.where(chunk_padded, lo, hi)
    if _has_bounds(spec):  # k_last − i·tq ≤ min rel_hi and k_start − (i+1)·tq + 1 ≥ max rel_lo
        rel_lo, rel_hi = block_relative_bounds(spec, arrays)
        flo = jnp.maximum(flo, _ceil_div(k_start + tk - 1 - jnp.min(rel_hi), tq))
        fhi = jnp.minimum(fhi, jnp.floor_divide(k_start - jnp.max(rel_lo) + 1, tq))
    return _clip_range(flo, fhi, lo, hi)


def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser (lowbias32): a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(rate: float) -> np.uint32:
    """Hash values below this are dropped: P(drop) = rate to 2^-32."""
    return np.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def dropout_keep(
    seed: Array,
    batch_idx: Array,
    head_idx: Array,
    rows: Array,
    cols: Array,
    rate: float,
    broadcast: bool,
) -> Array:
    """Keep-mask of dropout at (batch, head, query row, key column): a pure function of them.

    `seed` is a uint32 [2] array (from `jax.random.bits(dropout_rng, (2,), jnp.uint32)`) or a
    pair of uint32 scalars (inside a kernel). With `broadcast`, the mask is shared by all batch
    entries and heads (as in Flax). Index arrays broadcast against each other; the result is
    their broadcast shape.
    """
    seed0, seed1 = (jnp.asarray(s).astype(jnp.uint32) for s in (seed[0], seed[1]))
    if broadcast:
        bh = jnp.zeros((), jnp.uint32)
    else:
        bh = batch_idx.astype(jnp.uint32) * jnp.uint32(0x01000193) + head_idx.astype(jnp.uint32)
    t = _mix32(bh ^ seed1)
    t = _mix32(rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + t)
    x = _mix32((cols.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)) ^ t ^ seed0)
    return x >= dropout_threshold(rate)
