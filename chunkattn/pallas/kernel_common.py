"""What the forward and backward kernels share: `Static` (everything static about one call),
the per-batch `META` columns, the helpers inside the kernel bodies, and the optional inputs and
BlockSpecs around their pallas_calls.

Scores live in the log2 domain inside the kernels (s₂ = s·log₂e, so exp(s − m) = 2^(s₂ − m₂)),
which turns every exponential into one `exp2`; with a bias or score_fn they stay in the natural
domain, where any finite score is finite (`Static.log2_domain`).

Masks are computed in the kernel from indices (causal, window, q_offset, lengths, segment ids,
tail padding: `allowed`); the loop over blocks runs in three phases — partial blocks before,
full blocks (no mask arithmetic), partial blocks after — with bounds from the mask
(`kv_ranges`, `q_ranges`, `three_phase`), so blocks a causal or windowed mask rules out are
never loaded, and with segment ids only the blocks whose ids can meet (`segment_ranges`). A
user's `mask_fn` and `score_fn` are traced into the kernel bodies; a dense bias or mask is read
block by block in its own broadcast shape (`dense_block`, `extra_inputs`, `extra_specs`).
Dropout draws its keep-mask from the same position hash as the chunked path
(`masks.dropout_keep`), so forward, backward and every implementation agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chunkattn import chunked, masks

Array = jax.Array
Dims = tuple[bool, bool, bool, bool]  # which of a dense operand's (B, N, T, S) dims are full

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Masked scores are −inf and the running max is shifted by 0 while it is −inf, so a row tells
# "saw no key" (l = 0: output 0) from "saw keys with a huge negative bias" (the softmax).
F32_MAX = float(np.finfo(np.float32).max)


class Static(NamedTuple):
    """Everything static about one call (hashable)."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    soft_cap: float | None
    has_segments: bool
    mask_fn: Callable[..., Array] | None  # (batch, head, q_pos, k_pos) -> bool, elementwise
    score_fn: Callable[..., Array] | None  # (score, batch, head, q_pos, k_pos) -> score
    bias_dims: Dims | None  # a dense bias, read block by block
    mask_dims: Dims | None  # a dense mask (as int8), read block by block
    has_sinks: bool  # a per-head sink logit starts each row's running max and sum (forward)
    dropout_rate: float  # 0: no dropout
    broadcast_dropout: bool
    bias_grad: chunked.Static | None  # the chunked backward that computes the bias gradient
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    block_k_dq: int  # the dQ kernel's key block (block_q × block_k_dq; config.heuristic)
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    groups: int  # query heads per kv head
    head_dims: tuple[int, int]  # (H, Hv) of the arrays; blocks are `config.block_width` wide
    atomic_dq: bool  # PallasConfig.backward == "atomic"
    precision: Any
    interpret: bool
    mosaic: Any = None  # a `mosaic.Plan`: the Mosaic GPU forward replaces the Triton one

    @property
    def log2_domain(self) -> bool:
        """Scores in the log2 domain (one exp2 per weight) unless a bias or score_fn can push
        them past float32's range once scaled by log₂e; those run in the natural domain."""
        return self.bias_dims is None and self.score_fn is None

    @property
    def index_masks_only(self) -> bool:
        """True when masking is a function of positions alone: full blocks can be found."""
        return not (self.has_segments or self.mask_fn or self.mask_dims)


# ----------------------------------------------------------------------------- in-kernel helpers


def load(ref, dim: int, rows=None):
    """ref[rows, :] with the columns at or past `dim` (block padding) read as 0."""
    view = ref if rows is None else ref.at[rows, :]
    width = view.shape[-1]
    if width == dim:
        return view[...]
    return plgpu.load(view, mask=(jnp.arange(width) < dim)[None, :], other=0)


def store(ref, value, dim: int):
    """ref[...] = value, writing only the columns below `dim` (the array's head dim)."""
    width = ref.shape[-1]
    if width == dim:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=(jnp.arange(width) < dim)[None, :])


def cdiv(a, b: int):
    """ceil(a / b) for a ≥ 0 (Triton-friendly: no floor division on signed scalars)."""
    return jax.lax.div(jnp.asarray(a + (b - 1), jnp.int32), jnp.int32(b))  # int32 under x64


def fdiv(a, b: int):
    """floor(max(a, 0) / b): exact for a ≥ 0, 0 for a < 0 (callers clip at 0 anyway)."""
    return jax.lax.div(jnp.asarray(jnp.maximum(a, 0), jnp.int32), jnp.int32(b))


META = ("q_offset", "q_len", "kv_len", "seed0", "seed1", "rel_lo", "rel_hi", "unused")


def read_meta(st: Static, meta_ref):
    """(q_offset, q_len, kv_len, (rel_lo, rel_hi)) of this batch entry as int32 scalars.

    A key j is inside the causal/window bounds of row r iff rel_lo ≤ j − r ≤ rel_hi
    (`masks.relative_bounds`: saturated, so huge windows and offsets never wrap). Causal alone
    needs only rel_hi = q_offset clipped to ±REL_LIMIT, computed here (no window: no rel_lo).
    """
    m = meta_ref[...]
    idx = jnp.arange(len(META), dtype=jnp.int32)
    pick = lambda i: jnp.sum(jnp.where(idx == i, m, 0), dtype=jnp.int32)  # int32 under x64 too
    off = pick(0)
    if st.window is None:
        bounds = (None, jnp.clip(off, -masks.REL_LIMIT, masks.REL_LIMIT))
    else:
        bounds = (pick(5), pick(6))
    return off, pick(1), pick(2), bounds


def read_seed(st: Static, meta_ref):
    """The dropout seed as a pair of uint32 scalars (None without dropout)."""
    if st.dropout_rate == 0:
        return None
    m = meta_ref[...]
    idx = jnp.arange(len(META), dtype=jnp.int32)
    pick = lambda i: jax.lax.bitcast_convert_type(
        jnp.sum(jnp.where(idx == i, m, 0), dtype=jnp.int32), jnp.uint32
    )
    return pick(3), pick(4)


def keep_scale(st: Static) -> float:
    return 1.0 / (1.0 - st.dropout_rate)


def keep_mask(st: Static, seed, pos: Pos, rows):
    """Dropout's keep-mask of a block: the position hash shared with the chunked path."""
    return masks.dropout_keep(
        seed,
        pos.batch,
        pos.head,
        rows[:, None],
        pos.kpos[None, :],
        st.dropout_rate,
        st.broadcast_dropout,
    )


class Refs(NamedTuple):
    """The optional input refs after q, k, v, meta (None when the request has none)."""

    segq: Any
    segk: Any
    seg_range: Any  # (2,): the blocks [lo, hi) whose segment ids can meet this block's
    bias: Any
    mask: Any
    sinks: Any  # the forward kernel's only: (16,) copies of this head's sink


def split_refs(st: Static, refs, forward: bool = False) -> tuple[Refs, list]:
    """(optional inputs, outputs) from a kernel's trailing refs, in `extra_inputs` order."""
    refs = list(refs)
    has = (
        st.has_segments,
        st.has_segments,
        st.has_segments,
        st.bias_dims is not None,
        st.mask_dims is not None,
        forward and st.has_sinks,
    )
    return Refs(*(refs.pop(0) if h else None for h in has)), refs


class Pos(NamedTuple):
    """Where a block sits, in the shapes user functions get (broadcastable to [bq, bk])."""

    batch: Array  # (1, 1) int32
    head: Array  # (1, 1) int32, the query head
    qpos: Array  # (bq,) query positions: row + q_offset
    kpos: Array  # (bk,) key positions


def grid_position(st: Static):
    """(batch, head) of this program as (1, 1) int32 arrays, when a user function needs them."""
    if st.mask_fn is None and st.score_fn is None and st.dropout_rate == 0:
        return None, None
    full = lambda i: jnp.full((1, 1), pl.program_id(i), jnp.int32)
    return full(1), full(2)


def dense_block(ref, dims: Dims | None, q_sl, k_sl):
    """A dense operand's block, broadcastable to [bq, bk] (None without the operand).

    `q_sl` / `k_sl` slice the rows / columns the ref holds; None when the ref holds exactly this
    block's (its BlockSpec already selected them). A broadcast T or S dim is absent from the ref.
    """
    if dims is None:
        return None
    t_full, s_full = dims[2], dims[3]
    whole = slice(None)
    if t_full and s_full:
        return ref[whole if q_sl is None else q_sl, whole if k_sl is None else k_sl]
    if t_full:
        return (ref[...] if q_sl is None else ref[q_sl])[:, None]
    return (ref[...] if k_sl is None else ref[k_sl])[None, :]


def _apply_score_fn(st: Static, s, pos: Pos):
    out = st.score_fn(s, pos.batch, pos.head, pos.qpos[:, None], pos.kpos[None, :])
    return jnp.broadcast_to(out, s.shape).astype(jnp.float32)


def block_scores(st: Static, raw, pos: Pos, bias):
    """(biased, s) of a block from raw = q·kᵀ: score_fn's input and the final scores (in the
    log2 domain without bias and score_fn, else natural: `Static.log2_domain`).

    Order (as everywhere): scale·q·kᵀ → soft cap → + bias → score_fn. Without bias and
    score_fn the scale and log₂e fold into one multiply and `biased` is None.
    """
    if bias is None and st.score_fn is None:
        if st.soft_cap is None:
            return None, raw * (st.scale * LOG2E)
        return None, (st.soft_cap * LOG2E) * jnp.tanh(raw * (st.scale / st.soft_cap))
    s = raw * st.scale
    if st.soft_cap is not None:
        s = st.soft_cap * jnp.tanh(s / st.soft_cap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    biased = s
    if st.score_fn is not None:
        s = _apply_score_fn(st, s, pos)
    return biased, s  # natural domain (`Static.log2_domain`): a huge finite bias stays finite


def score_exp(st: Static, x):
    """exp in the kernels' score domain: 2^x for log2-domain scores, e^x otherwise."""
    return jnp.exp2(x) if st.log2_domain else jnp.exp(x)


def allowed(st: Static, pos: Pos, rows, bounds, kv_len, segq, segk, mask):
    """Predicate [bq, bk]: the key may be attended (tail keys lie at or past kv_len)."""
    qpos, cols = pos.qpos[:, None], pos.kpos[None, :]
    allowed = jnp.broadcast_to(cols < kv_len, (qpos.shape[0], cols.shape[1]))
    if st.is_causal or st.window is not None:
        rel = cols - rows[:, None]  # key − row: small, cannot wrap
        allowed &= rel <= bounds[1]
        if st.window is not None:
            allowed &= rel >= bounds[0]
    if st.has_segments:
        allowed &= segq[:, None] == segk[None, :]
    if mask is not None:
        allowed &= mask != 0
    if st.mask_fn is not None:
        allowed &= st.mask_fn(pos.batch, pos.head, qpos, cols)
    return allowed


def dscore(st: Static, ds, raw, biased, pos: Pos):
    """d loss/d(scale·q·kᵀ) from d loss/d(final scores): chain rule through score_fn, soft cap.

    score_fn is elementwise, so its derivative is the forward-mode derivative along ones.
    """
    if st.score_fn is not None:
        _, slope = jax.jvp(
            lambda x: _apply_score_fn(st, x, pos), (biased,), (jnp.ones_like(biased),)
        )
        ds = ds * slope
    if st.soft_cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh²
        t = jnp.tanh(raw * (st.scale / st.soft_cap))
        ds = ds * (1.0 - t * t)
    return ds


def segment_bounds(st: Static, ops: Refs):
    """(lo, hi) of the blocks whose segment ids can meet this program's (`segment_ranges`)."""
    if not st.has_segments:
        return None
    r = ops.seg_range[...]
    idx = jnp.arange(2, dtype=jnp.int32)
    return tuple(jnp.sum(jnp.where(idx == i, r, 0), dtype=jnp.int32) for i in (0, 1))


def kv_ranges(st: Static, q_start, bq: int, bk: int, nk: int, bounds, q_len, kv_len, seg):
    """Key blocks [lo, hi) seen by rows [q_start, q_start+bq), and the full ones [flo, fhi)."""
    rel_lo, rel_hi = bounds
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nk), cdiv(kv_len, bk))
    if seg is not None:  # packed sequences: only blocks whose segment ids can meet ours
        lo, hi = jnp.maximum(lo, seg[0]), jnp.minimum(hi, seg[1])
    fhi = jnp.minimum(hi, fdiv(kv_len, bk))  # blocks wholly below kv_len
    flo = lo
    if st.is_causal or st.window is not None:  # keys j − r ∈ [rel_lo, rel_hi]
        hi = jnp.minimum(hi, cdiv(jnp.maximum(q_start + bq + rel_hi, 0), bk))
        fhi = jnp.minimum(fhi, fdiv(q_start + rel_hi + 1, bk))
    if st.window is not None:
        lo = jnp.maximum(lo, fdiv(q_start + rel_lo, bk))
        flo = cdiv(jnp.maximum(q_start + bq - 1 + rel_lo, 0), bk)
    hi = jnp.where(q_start < q_len, jnp.maximum(hi, lo), lo)  # padding queries need no keys
    if not st.index_masks_only:
        flo = fhi = lo
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def q_ranges(st: Static, k_start, bq: int, bk: int, nq: int, bounds, q_len, kv_len, seg):
    """Query blocks [lo, hi) that see keys [k_start, k_start+bk), and the full ones [flo, fhi)."""
    rel_lo, rel_hi = bounds
    k_last = k_start + bk - 1
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nq), cdiv(q_len, bq))
    if seg is not None:  # packed sequences: only blocks whose segment ids can meet ours
        lo, hi = jnp.maximum(lo, seg[0]), jnp.minimum(hi, seg[1])
    flo = lo
    fhi = jnp.where(k_last < kv_len, hi, lo)
    if st.is_causal or st.window is not None:  # rows r ∈ [j − rel_hi, j − rel_lo]
        lo = jnp.maximum(lo, fdiv(k_start - rel_hi, bq))
        flo = cdiv(jnp.maximum(k_last - rel_hi, 0), bq)
    if st.window is not None:
        hi = jnp.minimum(hi, cdiv(jnp.maximum(k_last - rel_lo + 1, 0), bq))
        fhi = jnp.minimum(fhi, fdiv(k_start - rel_lo + 1, bq))
    hi = jnp.where(k_start < kv_len, jnp.maximum(hi, lo), lo)  # padding keys are seen by none
    if not st.index_masks_only:
        flo = fhi = lo
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def three_phase(lo, flo, fhi, hi, body, carry):
    """body(j, masked, carry) over [lo, flo) masked, [flo, fhi) unmasked, [fhi, hi) masked."""
    carry = jax.lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


# ---------------------------------------------------------------------- around the pallas_calls


def launch_params(st: Static, backward: bool = False):
    if backward:
        return plgpu.CompilerParams(num_warps=st.num_warps_bwd, num_stages=st.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def segment_ranges(q_seg, kv_seg, q_len, kv_len, bq: int, bk: int, blocked: str) -> Array:
    """int32 [B, n, 2]: for each query block (blocked="q") the key blocks [lo, hi) whose
    segment ids can equal one of its own, or for each key block (blocked="k") the query blocks.

    A block's ids span [min, max] over its positions below the length (padding excluded); two
    blocks can hold an allowed pair only if their spans meet, so the loops skip the rest:
    packed documents cost ≈ Σ Tᵢ² rather than (Σ Tᵢ)². Exact for any ids (sorted or not):
    [lo, hi) runs from the first block that meets to the last.
    """
    info = jnp.iinfo(q_seg.dtype)

    def spans(seg, length, blk):
        batch, size = seg.shape
        valid = jnp.arange(size)[None, :] < length[:, None]
        lo = jnp.where(valid, seg, info.max).reshape(batch, size // blk, blk).min(-1)
        hi = jnp.where(valid, seg, info.min).reshape(batch, size // blk, blk).max(-1)
        return lo, hi

    q_lo, q_hi = spans(q_seg, q_len, bq)  # (B, nq)
    k_lo, k_hi = spans(kv_seg, kv_len, bk)  # (B, nk)
    meets = (k_lo[:, None, :] <= q_hi[:, :, None]) & (k_hi[:, None, :] >= q_lo[:, :, None])
    if blocked == "k":
        meets = jnp.swapaxes(meets, 1, 2)  # (B, nk, nq)
    others = meets.shape[2]
    idx = jnp.arange(others, dtype=jnp.int32)
    last = jnp.max(jnp.where(meets, idx + 1, 0), axis=2)
    first = jnp.minimum(jnp.min(jnp.where(meets, idx, others), axis=2), last)  # none: [0, 0)
    return jnp.stack([first, last], axis=-1).astype(jnp.int32)


def grid_segment_ranges(
    st: Static, marr: masks.MaskArrays, meta: Array, blocked: str
) -> Array | None:
    """`segment_ranges` for the forward/dQ grid (blocked="q") or the dK/dV grid ("k")."""
    if not st.has_segments:
        return None
    bq, bk = (st.block_q, st.block_k) if blocked == "q" else (st.block_q_bwd, st.block_k_bwd)
    q_seg, kv_seg = marr.q_segment_ids, marr.kv_segment_ids
    return segment_ranges(q_seg, kv_seg, meta[:, 1], meta[:, 2], bq, bk, blocked)


def extra_inputs(
    st: Static, bias, marr: masks.MaskArrays, padded_seq_k: int, seg_range: Array | None
) -> list[Array]:
    """The optional kernel inputs, in `split_refs` order: segment ids and the kernel's
    `segment_ranges`, bias, mask (int8).

    A dense operand broadcast over both T and S is widened to S (B·N·S elements) so that every
    operand the kernels read has its key dim, or its query dim, or both.
    """
    out = []
    if st.has_segments:
        out += [marr.q_segment_ids, marr.kv_segment_ids, seg_range]
    for x, dims in ((bias, st.bias_dims), (marr.mask, st.mask_dims)):
        if dims is None:
            continue
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.int8)
        if x.shape[2] == 1 and x.shape[3] == 1:
            x = jnp.broadcast_to(x, (*x.shape[:3], padded_seq_k))
        out.append(x)
    return out


def extra_specs(st: Static, *, rows: int, cols: int, blocked: str) -> list[pl.BlockSpec]:
    """BlockSpecs of `extra_inputs` for a grid (i, b, n) blocked over queries or keys.

    `blocked` is "q" (forward, dQ: program i holds query rows i·rows…) or "k" (dK/dV: program i
    holds key columns i·cols…); the other sequence dim is whole (rows or cols elements).
    """
    specs = []
    if st.has_segments:
        q_block, k_block = (rows, None) if blocked == "q" else (None, cols)
        specs += [
            pl.BlockSpec((None, rows), lambda i, b, n: (b, i if q_block else 0)),
            pl.BlockSpec((None, cols), lambda i, b, n: (b, 0 if q_block else i)),
            pl.BlockSpec((None, None, 2), lambda i, b, n: (b, i, 0)),  # segment_ranges
        ]
    for dims in (st.bias_dims, st.mask_dims):
        if dims is None:
            continue
        shape = (None, None, rows if dims[2] else None, cols if dims[3] else None)

        def index(i, b, n, dims=dims):
            return (
                b if dims[0] else 0,
                n if dims[1] else 0,
                i if blocked == "q" and dims[2] else 0,
                i if blocked == "k" and dims[3] else 0,
            )

        specs.append(pl.BlockSpec(shape, index))
    return specs


def pad_to(x: Array, axis: int, size: int, value: Any = 0) -> Array:
    """x padded with `value` along `axis` to `size` (unchanged when already that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)
