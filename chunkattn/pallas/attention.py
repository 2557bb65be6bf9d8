"""Fused FlashAttention-2 kernels in Pallas (Triton lowering) for NVIDIA GPUs.

One file for the kernel family (as jax's own `pallas/ops/gpu/attention.py`): the validated
`PallasConfig`, the forward kernel (output and log-sum-exp), the two backward kernels (dK/dV
looping over query blocks, dQ looping over key blocks; FlashAttention-2, arXiv 2307.08691
§3.1), and the custom_vjp wiring. Scores live in the log2 domain inside the kernels
(s₂ = s·log₂e, so exp(s − m) = 2^(s₂ − m₂)), which turns every exponential into one `exp2`;
with a bias or score_fn they stay in the natural domain, where any finite score is finite.

Masks are computed in the kernel from indices (causal, window, q_offset, lengths, segment ids,
tail padding); the loop over blocks runs in three phases — partial blocks before, full blocks
(no mask arithmetic), partial blocks after — with bounds from the mask, so blocks a causal or
windowed mask rules out are never loaded. GQA maps query head n to kv head n // G in the
BlockSpec index map: K and V are never repeated.

A user's `mask_fn` and `score_fn` are traced into the kernel bodies (the backward kernels
differentiate `score_fn` by a forward-mode derivative of the traced function, exact for an
elementwise function); a dense bias or mask is read block by block in its own broadcast shape.
Dropout draws its keep-mask from the same position hash as the chunked path
(`masks.dropout_keep`), so forward, backward and every implementation agree. What the kernels
cannot do raises NotImplementedError naming the feature, and
`dot_product_attention(implementation=None)` falls back to the chunked path: a
`mask_fn`/`score_fn` that closes over arrays or uses an operation the Triton lowering lacks.
The gradient of a dense bias is computed by the chunked path's backward from the kernels'
residuals (XLA drops that computation when the bias is not differentiated).

Set CHUNKATTN_PALLAS_INTERPRET=1 to run the kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
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


def interpret_mode() -> bool:
    return os.environ.get("CHUNKATTN_PALLAS_INTERPRET", "") not in ("", "0")


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Block sizes and launch parameters of the Pallas kernels (None: per-shape heuristic).

    block_q / block_k tile the forward and dQ kernels; block_q_bwd / block_k_bwd the dK/dV
    kernel; the *_bwd launch parameters serve both backward kernels. Blocks are powers of two
    ≥ 16; warps in {1, 2, 4, 8, 16}; stages 1–8.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    # "split": dQ in its own kernel (recomputes P and dP: 7 matmuls per block pair in all);
    # "atomic": the dK/dV kernel also adds dS·K into a float32 dQ with atomics (5 matmuls).
    backward: str = "split"

    def __post_init__(self):
        if self.backward not in ("split", "atomic"):
            raise ValueError(
                f"PallasConfig.backward must be 'split' or 'atomic', got {self.backward!r}"
            )
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not _is_pow2(v) or v < 16):
                raise ValueError(f"PallasConfig.{name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "num_warps_bwd"):
            v = getattr(self, name)
            if v is not None and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"PallasConfig.{name} must be 1, 2, 4, 8 or 16, got {v!r}")
        for name in ("num_stages", "num_stages_bwd"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 1 <= v <= 8):
                raise ValueError(f"PallasConfig.{name} must be in 1..8, got {v!r}")


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
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    groups: int  # query heads per kv head
    head_dims: tuple[int, int]  # (H, Hv) of the arrays; blocks are `block_width` wide
    atomic_dq: bool  # PallasConfig.backward == "atomic"
    precision: Any
    interpret: bool

    @property
    def log2_domain(self) -> bool:
        """Scores in the log2 domain (one exp2 per weight) unless a bias or score_fn can push
        them past float32's range once scaled by log₂e; those run in the natural domain."""
        return self.bias_dims is None and self.score_fn is None

    @property
    def index_masks_only(self) -> bool:
        """True when masking is a function of positions alone: full blocks can be found."""
        return not (self.has_segments or self.mask_fn or self.mask_dims)


def _heuristic(
    head_dim: int,
    dtype: Any,
    seq_q: int,
    seq_k: int,
    cfg: PallasConfig,
    dense_tiles: bool = False,
) -> dict:
    """Block sizes per head dim and dtype (bench/NOTES.md), clipped to the sequence.

    `dense_tiles`: a dense bias or mask varies along both T and S, so the forward and dQ loops
    also stream a (block_q, block_k) tile of it through shared memory each step.
    """
    wide = jnp.dtype(dtype).itemsize >= 4  # float32 tiles take twice the shared memory
    # H=128 from bench/pallas_tune.py on the H100 (bench/NOTES.md); the others are untuned.
    if head_dim <= 64:
        bq, bk, warps, stages, bq_b, bk_b = 128, 64, 4, 3, 64, 64
    elif head_dim <= 128:
        bq, bk, warps, stages, bq_b, bk_b = 128, 128, 8, 2, 32, 128
    else:
        bq, bk, warps, stages, bq_b, bk_b = 64, 32, 8, 2, 32, 32
    if wide:
        bq, bk, bq_b, bk_b = (
            max(bq // 2, 16),
            max(bk // 2, 16),
            max(bq_b // 2, 16),
            max(bk_b // 2, 16),
        )

    if dense_tiles:
        # At 128×128 bf16 with 2 stages, K and V tiles take 128 KiB, Q 32 KiB, and a pipelined
        # 128×128 bias tile another 64 KiB: past the H100's 227 KiB with Triton's scratch. Half
        # the key block keeps the loop's tiles at ~100 KiB (a prediction, bench/NOTES.md v5).
        bk = max(bk // 2, 16)

    def clip(b: int, n: int) -> int:
        return max(16, min(b, pl.next_power_of_2(n)))

    return dict(
        block_q=clip(cfg.block_q or bq, seq_q),
        block_k=clip(cfg.block_k or bk, seq_k),
        block_q_bwd=clip(cfg.block_q_bwd or bq_b, seq_q),
        block_k_bwd=clip(cfg.block_k_bwd or bk_b, seq_k),
        num_warps=cfg.num_warps or warps,
        num_stages=cfg.num_stages or stages,
        num_warps_bwd=cfg.num_warps_bwd or warps,
        num_stages_bwd=cfg.num_stages_bwd or 2,
    )


def block_width(head_dim: int) -> int:
    """A head dim's block width in the kernels: the next power of two, at least 16.

    The arrays keep their own head dims (no padded copy in HBM): a kernel loads a block with
    the columns past the head dim masked to 0 and stores only the head dim's columns.
    """
    return max(16, pl.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------- in-kernel helpers


def _load(ref, dim: int, rows=None):
    """ref[rows, :] with the columns at or past `dim` (block padding) read as 0."""
    view = ref if rows is None else ref.at[rows, :]
    width = view.shape[-1]
    if width == dim:
        return view[...]
    return plgpu.load(view, mask=(jnp.arange(width) < dim)[None, :], other=0)


def _store(ref, value, dim: int):
    """ref[...] = value, writing only the columns below `dim` (the array's head dim)."""
    width = ref.shape[-1]
    if width == dim:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=(jnp.arange(width) < dim)[None, :])


def _cdiv(a, b: int):
    """ceil(a / b) for a ≥ 0 (Triton-friendly: no floor division on signed scalars)."""
    return jax.lax.div(jnp.asarray(a + (b - 1), jnp.int32), jnp.int32(b))  # int32 under x64


def _fdiv(a, b: int):
    """floor(max(a, 0) / b): exact for a ≥ 0, 0 for a < 0 (callers clip at 0 anyway)."""
    return jax.lax.div(jnp.asarray(jnp.maximum(a, 0), jnp.int32), jnp.int32(b))


META = ("q_offset", "q_len", "kv_len", "seed0", "seed1", "rel_lo", "rel_hi", "unused")


def _meta(st: Static, meta_ref):
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


def _seed(st: Static, meta_ref):
    """The dropout seed as a pair of uint32 scalars (None without dropout)."""
    if st.dropout_rate == 0:
        return None
    m = meta_ref[...]
    idx = jnp.arange(len(META), dtype=jnp.int32)
    pick = lambda i: jax.lax.bitcast_convert_type(
        jnp.sum(jnp.where(idx == i, m, 0), dtype=jnp.int32), jnp.uint32
    )
    return pick(3), pick(4)


def _keep_scale(st: Static) -> float:
    return 1.0 / (1.0 - st.dropout_rate)


def _keep(st: Static, seed, pos: _Pos, rows):
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


class _Refs(NamedTuple):
    """The optional input refs after q, k, v, meta (None when the request has none)."""

    segq: Any
    segk: Any
    seg_range: Any  # (2,): the blocks [lo, hi) whose segment ids can meet this block's
    bias: Any
    mask: Any
    sinks: Any  # the forward kernel's only: (16,) copies of this head's sink


def _split_refs(st: Static, refs, forward: bool = False) -> tuple[_Refs, list]:
    """(optional inputs, outputs) from a kernel's trailing refs, in `_extra_inputs` order."""
    refs = list(refs)
    has = (
        st.has_segments,
        st.has_segments,
        st.has_segments,
        st.bias_dims is not None,
        st.mask_dims is not None,
        forward and st.has_sinks,
    )
    return _Refs(*(refs.pop(0) if h else None for h in has)), refs


class _Pos(NamedTuple):
    """Where a block sits, in the shapes user functions get (broadcastable to [bq, bk])."""

    batch: Array  # (1, 1) int32
    head: Array  # (1, 1) int32, the query head
    qpos: Array  # (bq,) query positions: row + q_offset
    kpos: Array  # (bk,) key positions


def _grid_position(st: Static):
    """(batch, head) of this program as (1, 1) int32 arrays, when a user function needs them."""
    if st.mask_fn is None and st.score_fn is None and st.dropout_rate == 0:
        return None, None
    full = lambda i: jnp.full((1, 1), pl.program_id(i), jnp.int32)
    return full(1), full(2)


def _dense(ref, dims: Dims | None, q_sl, k_sl):
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


def _apply_score_fn(st: Static, s, pos: _Pos):
    out = st.score_fn(s, pos.batch, pos.head, pos.qpos[:, None], pos.kpos[None, :])
    return jnp.broadcast_to(out, s.shape).astype(jnp.float32)


def _block_scores(st: Static, raw, pos: _Pos, bias):
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


def _exp(st: Static, x):
    """exp in the kernels' score domain: 2^x for log2-domain scores, e^x otherwise."""
    return jnp.exp2(x) if st.log2_domain else jnp.exp(x)


def _allowed(st: Static, pos: _Pos, rows, bounds, kv_len, segq, segk, mask):
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


def _dscore(st: Static, ds, raw, biased, pos: _Pos):
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


def _segment_bounds(st: Static, ops: _Refs):
    """(lo, hi) of the blocks whose segment ids can meet this program's (`segment_ranges`)."""
    if not st.has_segments:
        return None
    r = ops.seg_range[...]
    idx = jnp.arange(2, dtype=jnp.int32)
    return tuple(jnp.sum(jnp.where(idx == i, r, 0), dtype=jnp.int32) for i in (0, 1))


def _kv_ranges(st: Static, q_start, bq: int, bk: int, nk: int, bounds, q_len, kv_len, seg):
    """Key blocks [lo, hi) seen by rows [q_start, q_start+bq), and the full ones [flo, fhi)."""
    rel_lo, rel_hi = bounds
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nk), _cdiv(kv_len, bk))
    if seg is not None:  # packed sequences: only blocks whose segment ids can meet ours
        lo, hi = jnp.maximum(lo, seg[0]), jnp.minimum(hi, seg[1])
    fhi = jnp.minimum(hi, _fdiv(kv_len, bk))  # blocks wholly below kv_len
    flo = lo
    if st.is_causal or st.window is not None:  # keys j − r ∈ [rel_lo, rel_hi]
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(q_start + bq + rel_hi, 0), bk))
        fhi = jnp.minimum(fhi, _fdiv(q_start + rel_hi + 1, bk))
    if st.window is not None:
        lo = jnp.maximum(lo, _fdiv(q_start + rel_lo, bk))
        flo = _cdiv(jnp.maximum(q_start + bq - 1 + rel_lo, 0), bk)
    hi = jnp.where(q_start < q_len, jnp.maximum(hi, lo), lo)  # padding queries need no keys
    if not st.index_masks_only:
        flo = fhi = lo
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def _q_ranges(st: Static, k_start, bq: int, bk: int, nq: int, bounds, q_len, kv_len, seg):
    """Query blocks [lo, hi) that see keys [k_start, k_start+bk), and the full ones [flo, fhi)."""
    rel_lo, rel_hi = bounds
    k_last = k_start + bk - 1
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nq), _cdiv(q_len, bq))
    if seg is not None:  # packed sequences: only blocks whose segment ids can meet ours
        lo, hi = jnp.maximum(lo, seg[0]), jnp.minimum(hi, seg[1])
    flo = lo
    fhi = jnp.where(k_last < kv_len, hi, lo)
    if st.is_causal or st.window is not None:  # rows r ∈ [j − rel_hi, j − rel_lo]
        lo = jnp.maximum(lo, _fdiv(k_start - rel_hi, bq))
        flo = _cdiv(jnp.maximum(k_last - rel_hi, 0), bq)
    if st.window is not None:
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(k_last - rel_lo + 1, 0), bq))
        fhi = jnp.minimum(fhi, _fdiv(k_start - rel_lo + 1, bq))
    hi = jnp.where(k_start < kv_len, jnp.maximum(hi, lo), lo)  # padding keys are seen by none
    if not st.index_masks_only:
        flo = fhi = lo
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def _three_phase(lo, flo, fhi, hi, body, carry):
    """body(j, masked, carry) over [lo, flo) masked, [flo, fhi) unmasked, [fhi, hi) masked."""
    carry = jax.lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


# ------------------------------------------------------------------------------------ kernels


def _fwd_kernel(q_ref, k_ref, v_ref, meta_ref, *refs, st: Static, nk: int):
    ops, (o_ref, lse_ref) = _split_refs(st, refs, forward=True)
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    batch, head = _grid_position(st)
    off, q_len, kv_len, bounds = _meta(st, meta_ref)
    seed = _seed(st, meta_ref)
    hd, hdv = st.head_dims
    q = _load(q_ref, hd)  # (bq, H)
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)
    qpos = rows + off
    segq = ops.segq[...] if st.has_segments else None  # this program's query block

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * bk
        ks = pl.ds(k_start, bk)
        k, v = _load(k_ref, hd, ks), _load(v_ref, hdv, ks)  # (bk, H), (bk, Hv)
        pos = _Pos(batch, head, qpos, k_start + jnp.arange(bk, dtype=jnp.int32))
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)  # (bq, bk)
        _, s = _block_scores(st, raw, pos, _dense(ops.bias, st.bias_dims, None, ks))
        if masked:
            segk = ops.segk[ks] if st.has_segments else None
            mask = _dense(ops.mask, st.mask_dims, None, ks)
            s = jnp.where(_allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: 2^(−inf − 0) = 0
        alpha = _exp(st, m - shift)
        p = _exp(st, s - shift[:, None])
        l = l * alpha + jnp.sum(p, axis=1)  # the normaliser counts dropped weights too
        if st.dropout_rate:
            p = jnp.where(_keep(st, seed, pos, rows), p * _keep_scale(st), 0.0)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=st.precision)
        return acc, m_new, l

    seg = _segment_bounds(st, ops)
    lo, flo, fhi, hi = _kv_ranges(st, q_start, bq, bk, nk, bounds, q_len, kv_len, seg)
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
    if st.has_sinks:  # the sink is one more score with no value: max = sink, sum = 1
        sink = jnp.max(ops.sinks[...]) * (LOG2E if st.log2_domain else 1.0)
        m0 = jnp.full((bq,), sink, jnp.float32)
        l0 = jnp.where(m0 > -jnp.inf, 1.0, 0.0)
    init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), m0, l0)
    acc, m, l = _three_phase(lo, flo, fhi, hi, body, init)
    valid = (l > 0) & (rows < q_len)  # saw a key or a sink (a finite bias keeps l ≥ 1)
    safe_l = jnp.where(valid, l, 1.0)
    _store(o_ref, jnp.where(valid[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype), hdv)
    lse = m * LN2 + jnp.log(safe_l) if st.log2_domain else m + jnp.log(safe_l)
    lse_ref[...] = jnp.where(valid, lse, -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *refs, st, nk):
    ops, (dq_ref,) = _split_refs(st, refs)
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    batch, head = _grid_position(st)
    off, q_len, kv_len, bounds = _meta(st, meta_ref)
    seed = _seed(st, meta_ref)
    hd, hdv = st.head_dims
    q, do = _load(q_ref, hd), _load(do_ref, hdv)  # (bq, H), (bq, Hv)
    lse2, delta = lse_ref[...], delta_ref[...]  # (bq,) log2-domain lse (+inf: no key), D
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)
    qpos = rows + off
    segq = ops.segq[...] if st.has_segments else None  # this program's query block

    def body(j, dq, masked):
        k_start = j * bk
        ks = pl.ds(k_start, bk)
        k, v = _load(k_ref, hd, ks), _load(v_ref, hdv, ks)
        pos = _Pos(batch, head, qpos, k_start + jnp.arange(bk, dtype=jnp.int32))
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)
        biased, s = _block_scores(st, raw, pos, _dense(ops.bias, st.bias_dims, None, ks))
        if masked:
            segk = ops.segk[ks] if st.has_segments else None
            mask = _dense(ops.mask, st.mask_dims, None, ks)
            s = jnp.where(_allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        p = _exp(st, s - lse2[:, None])  # P = exp(s − lse); 0 where masked
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)  # dO·Vᵀ
        if st.dropout_rate:
            dp = jnp.where(_keep(st, seed, pos, rows), dp * _keep_scale(st), 0.0)
        ds = _dscore(st, p * (dp - delta[:, None]), raw, biased, pos)  # dS = P ∘ (dP − D)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=st.precision)

    seg = _segment_bounds(st, ops)
    lo, flo, fhi, hi = _kv_ranges(st, q_start, bq, bk, nk, bounds, q_len, kv_len, seg)
    dq = _three_phase(lo, flo, fhi, hi, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    _store(dq_ref, (dq * st.scale).astype(dq_ref.dtype), hd)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *refs, st, nq):
    ops, outs = _split_refs(st, refs)
    dq_ref = None
    if st.atomic_dq:  # dQ (float32, zeroed) is aliased in and out; the output ref is used
        _, dk_ref, dv_ref, dq_ref = outs
    else:
        dk_ref, dv_ref = outs
    bq, bk = st.block_q_bwd, st.block_k_bwd
    k_start = pl.program_id(0) * bk
    batch, head = _grid_position(st)
    off, q_len, kv_len, bounds = _meta(st, meta_ref)
    seed = _seed(st, meta_ref)
    hd, hdv = st.head_dims
    k, v = _load(k_ref, hd), _load(v_ref, hdv)  # (bk, H), (bk, Hv)
    cols = k_start + jnp.arange(bk, dtype=jnp.int32)
    segk = ops.segk[...] if st.has_segments else None  # this program's key block

    def body(i, carry, masked):
        dk, dv = carry
        q_start = i * bq
        qs = pl.ds(q_start, bq)
        q, do = _load(q_ref, hd, qs), _load(do_ref, hdv, qs)
        lse2, delta = lse_ref[qs], delta_ref[qs]
        rows = q_start + jnp.arange(bq, dtype=jnp.int32)
        pos = _Pos(batch, head, rows + off, cols)
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)  # (bq, bk)
        biased, s = _block_scores(st, raw, pos, _dense(ops.bias, st.bias_dims, qs, None))
        if masked:
            segq = ops.segq[qs] if st.has_segments else None
            mask = _dense(ops.mask, st.mask_dims, qs, None)
            s = jnp.where(_allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        p = _exp(st, s - lse2[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)
        p_drop = p
        if st.dropout_rate:
            keep = _keep(st, seed, pos, rows)
            p_drop = jnp.where(keep, p * _keep_scale(st), 0.0)
            dp = jnp.where(keep, dp * _keep_scale(st), 0.0)
        dv = dv + plgpu.dot(p_drop.astype(do.dtype), do, trans_a=True, precision=st.precision)
        ds = _dscore(st, p * (dp - delta[:, None]), raw, biased, pos)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=st.precision)
        if dq_ref is not None:
            dq = plgpu.dot(ds.astype(k.dtype), k, precision=st.precision) * st.scale
            width = dq.shape[-1]
            in_head = None if width == hd else (jnp.arange(width) < hd)[None, :]
            plgpu.atomic_add(dq_ref, (qs, slice(None)), dq, mask=in_head)
        return dk, dv

    seg = _segment_bounds(st, ops)
    lo, flo, fhi, hi = _q_ranges(st, k_start, bq, bk, nq, bounds, q_len, kv_len, seg)
    init = (
        jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dk, dv = _three_phase(lo, flo, fhi, hi, body, init)
    _store(dk_ref, (dk * st.scale).astype(dk_ref.dtype), hd)
    _store(dv_ref, dv.astype(dv_ref.dtype), hdv)


# ------------------------------------------------------------------------------ pallas_calls


def _params(st: Static, backward: bool = False):
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


def _ranges(st: Static, marr: masks.MaskArrays, meta: Array, blocked: str) -> Array | None:
    """`segment_ranges` for the forward/dQ grid (blocked="q") or the dK/dV grid ("k")."""
    if not st.has_segments:
        return None
    bq, bk = (st.block_q, st.block_k) if blocked == "q" else (st.block_q_bwd, st.block_k_bwd)
    q_seg, kv_seg = marr.q_segment_ids, marr.kv_segment_ids
    return segment_ranges(q_seg, kv_seg, meta[:, 1], meta[:, 2], bq, bk, blocked)


def _extra_inputs(
    st: Static, bias, marr: masks.MaskArrays, padded_seq_k: int, seg_range: Array | None
) -> list[Array]:
    """The optional kernel inputs, in `_split_refs` order: segment ids and the kernel's
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


def _extra_specs(st: Static, *, rows: int, cols: int, blocked: str) -> list[pl.BlockSpec]:
    """BlockSpecs of `_extra_inputs` for a grid (i, b, n) blocked over queries or keys.

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


def _forward(st: Static, q, k, v, bias, meta, marr, sinks):
    batch, seq_q, num_heads, _ = q.shape
    seq_k = k.shape[1]
    head_dim, head_dim_v = map(block_width, st.head_dims)  # block widths
    bq, g = st.block_q, st.groups
    grid = (seq_q // bq, batch, num_heads)
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, n: (b, 0, n // g, 0)),
        pl.BlockSpec((None, seq_k, None, head_dim_v), lambda i, b, n: (b, 0, n // g, 0)),
        pl.BlockSpec((None, len(META)), lambda i, b, n: (b, 0)),
        *_extra_specs(st, rows=bq, cols=seq_k, blocked="q"),
    ]
    extra = _extra_inputs(st, bias, marr, seq_k, _ranges(st, marr, meta, "q"))
    if st.has_sinks:  # 16 copies per head: a block the Triton lowering loads as a vector
        in_specs.append(pl.BlockSpec((None, 16), lambda i, b, n: (n, 0)))
        extra.append(jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (num_heads, 16)))
    out_specs = [
        pl.BlockSpec((None, bq, None, head_dim_v), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, seq_q, num_heads, st.head_dims[1]), q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32),
    ]
    kernel = functools.partial(_fwd_kernel, st=st, nk=seq_k // st.block_k)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(st),
        interpret=st.interpret,
        name="chunkattn_fwd",
    )(q, k, v, meta, *extra)


def _backward(st: Static, q, k, v, bias, meta, marr, out, lse, dout, dlse):
    batch, seq_q, num_heads, _ = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    head_dim, head_dim_v = map(block_width, st.head_dims)  # block widths
    g = st.groups
    # D = rowsum(dO ∘ O) − dlse (the lse output's cotangent enters dS as +P·dlse).
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    no_key = ~jnp.isfinite(lse) | (lse >= F32_MAX)  # −inf, or the residual's F32_MAX
    lse2 = jnp.where(no_key, jnp.inf, lse * LOG2E if st.log2_domain else lse)  # no key: P = 0
    extra = _extra_inputs(st, bias, marr, seq_k, _ranges(st, marr, meta, "q"))
    full_row = pl.BlockSpec((None, None, seq_q), lambda j, b, n: (b, n, 0))
    dq = None
    if not st.atomic_dq:
        dq = _dq_call(st, q, k, v, dout, lse2, delta, meta, extra)

    bk = st.block_k_bwd
    part_dtype = k.dtype if g == 1 else jnp.float32  # per-query-head partials, summed below
    whole_q = pl.BlockSpec((None, seq_q, None, head_dim), lambda j, b, n: (b, 0, n, 0))
    in_specs = [
        whole_q,
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n // g, 0)),
        pl.BlockSpec((None, bk, None, head_dim_v), lambda j, b, n: (b, j, n // g, 0)),
        pl.BlockSpec((None, seq_q, None, head_dim_v), lambda j, b, n: (b, 0, n, 0)),
        full_row,
        full_row,
        pl.BlockSpec((None, len(META)), lambda j, b, n: (b, 0)),
        *_extra_specs(st, rows=seq_q, cols=bk, blocked="k"),
    ]
    out_specs = [
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n, 0)),
        pl.BlockSpec((None, bk, None, head_dim_v), lambda j, b, n: (b, j, n, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, seq_k, num_heads, st.head_dims[0]), part_dtype),
        jax.ShapeDtypeStruct((batch, seq_k, num_heads, st.head_dims[1]), part_dtype),
    ]
    extra = _extra_inputs(st, bias, marr, seq_k, _ranges(st, marr, meta, "k"))
    operands = [q, k, v, dout, lse2, delta, meta, *extra]
    aliases = {}
    if st.atomic_dq:
        aliases = {len(operands): 2}
        operands.append(jnp.zeros(q.shape, jnp.float32))
        in_specs.append(whole_q)
        out_specs.append(whole_q)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    grads = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, nq=seq_q // st.block_q_bwd),
        grid=(seq_k // bk, batch, num_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dkdv",
    )(*operands)
    dk, dv = grads[:2]
    if st.atomic_dq:
        dq = grads[2].astype(q.dtype)
    if g > 1:  # (B, S, K, G, H) summed over the group's query heads
        dk = dk.reshape(batch, seq_k, num_kv_heads, g, k.shape[-1]).sum(3).astype(k.dtype)
        dv = dv.reshape(batch, seq_k, num_kv_heads, g, v.shape[-1]).sum(3).astype(v.dtype)
    return dq, dk, dv


def _dq_call(st: Static, q, k, v, dout, lse2, delta, meta, extra):
    """The dQ kernel's pallas_call: grid over query blocks, each looping over key blocks."""
    batch, seq_q, num_heads, _ = q.shape
    seq_k = k.shape[1]
    head_dim, head_dim_v = map(block_width, st.head_dims)  # block widths
    bq, g = st.block_q, st.groups
    row_spec = lambda blk: pl.BlockSpec((None, None, blk), lambda i, b, n: (b, n, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nk=seq_k // st.block_k),
        grid=(seq_q // bq, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, n: (b, 0, n // g, 0)),
            pl.BlockSpec((None, seq_k, None, head_dim_v), lambda i, b, n: (b, 0, n // g, 0)),
            pl.BlockSpec((None, bq, None, head_dim_v), lambda i, b, n: (b, i, n, 0)),
            row_spec(bq),
            row_spec(bq),
            pl.BlockSpec((None, len(META)), lambda i, b, n: (b, 0)),
            *_extra_specs(st, rows=bq, cols=seq_k, blocked="q"),
        ],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dq",
    )(q, k, v, dout, lse2, delta, meta, *extra)


def _bias_grad(st: Static, q, k, v, bias, meta, marr, seed, out, lse, dout, dlse):
    """dS reduced to the bias's own (broadcast) shape, by the chunked backward.

    The kernels would have to sum dS over the bias's broadcast dims across programs; the
    chunked backward does exactly that from the same residuals. Query rows the kernels treat as
    padding (lse −inf) are masked there too. When the bias is not differentiated XLA removes
    this computation as dead code.
    """
    marr = marr._replace(q_lengths=meta[:, 1], kv_lengths=meta[:, 2])
    grads = chunked._backward(st.bias_grad, q, k, v, bias, (), marr, seed, out, lse, dout, dlse)
    return grads[3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(st: Static, q, k, v, bias, meta, marr, seed, sinks):
    """Fused attention on inputs padded to whole blocks: (out [B, Tp, N, Hv], lse f32 [B, N, Tp]).

    `meta` is int32 [B, 8] (`META`); `seed` (uint32 [2], or None) is also in meta's columns 3–4
    for the kernels and is passed whole for the bias gradient's chunked backward. `sinks` [N]
    (or None) start every row of the forward kernel; the backward kernels see them through
    the lse, and their own gradient is `chunked.sink_gradient` of the residuals.
    """
    return _first_order_forward(st, q, k, v, bias, meta, marr, sinks)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_forward(st: Static, q, k, v, bias, meta, marr, sinks):
    """The forward kernel. A second derivative differentiates it under a JVP, which pallas_call
    cannot do; the rule below says so instead of failing inside Pallas."""
    return _forward(st, q, k, v, bias, meta, marr, sinks)


@_first_order_forward.defjvp
def _no_forward_jvp(st, primals, tangents):
    del st, primals, tangents
    raise NotImplementedError(
        "second-order derivatives (grad of grad, Hessians) are not implemented by the pallas "
        "kernels; use implementation='xla' for them"
    )


def _flash_fwd(st, q, k, v, bias, meta, marr, seed, sinks):
    out, lse = _first_order_forward(st, q, k, v, bias, meta, marr, sinks)
    # Residuals are outputs of the forward program: finite, so jax.debug_infs stays quiet.
    # F32_MAX stands for a row that saw no key (the backward reads it as +inf: P = 0).
    lse_res = jnp.where(jnp.isfinite(lse), lse, F32_MAX)
    return (out, lse), (q, k, v, bias, meta, marr, seed, out, lse_res, sinks)


def _flash_bwd(st, res, cotangents):
    dout, dlse = cotangents
    return _first_order_bwd(st, res, dout, dlse)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_bwd(st, res, dout, dlse):
    """The backward kernels; differentiating them again raises a clear error (their loops have
    data-dependent bounds, which JAX cannot reverse-differentiate)."""
    q, k, v, bias, meta, marr, seed, out, lse, sinks = res
    dq, dk, dv = _backward(st, q, k, v, bias, meta, marr, out, lse, dout, dlse)
    dbias = None
    if bias is not None:
        dbias = _bias_grad(st, q, k, v, bias, meta, marr, seed, out, lse, dout, dlse)
    # The sink's dS = P_sink·(0 − D): one reduction over rows, beside D's (rows whose residual
    # lse is F32_MAX, padding included, saw neither key nor sink in the kernel: P_sink = 0).
    dsinks = None if sinks is None else chunked.sink_gradient(sinks, out, lse, dout, dlse)
    no_grad = jax.tree_util.tree_map(lambda _: None, (marr, seed))
    return dq, dk, dv, dbias, None, *no_grad, dsinks


_first_order_bwd.defjvp(_no_forward_jvp)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------- entry


def _pad_to(x: Array, axis: int, size: int, value: Any = 0) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _pad_dense(x: Array, pq: int, pk: int, value: Any) -> Array:
    """A [b, n, t, s] bias/mask padded to (pq, pk) on its full dims; broadcast dims stay 1."""
    if x.shape[2] != 1:
        x = _pad_to(x, 2, pq, value)
    return x if x.shape[3] == 1 else _pad_to(x, 3, pk, value)


def _lowerable_primitives() -> set[str] | None:
    """Names of the primitives the Triton lowering implements (None: unknown, assume all)."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:  # pragma: no cover - private module moved
        return None
    return {str(p) for p in lowering.triton_lowering_rules}


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, including those of its sub-jaxprs (jit, custom_jvp, cond)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(str(eqn.primitive))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def _check_user_fn(name: str, fn: Callable[..., Array], *example: Any) -> None:
    """Raise NotImplementedError unless `fn` can be traced into a kernel body.

    A kernel cannot capture arrays (a function closing over a table, or over a traced value,
    must run in the chunked path), and the Triton lowering implements a fixed set of
    primitives; both are checked on the function's jaxpr at the kernel's block shapes.
    """
    closed = jax.make_jaxpr(fn)(*example)
    if closed.consts:
        shapes = ", ".join(str(getattr(c, "shape", ())) for c in closed.consts)
        raise NotImplementedError(
            f"the pallas kernels do not implement a {name} that closes over arrays (shapes "
            f"{shapes}); pass implementation='chunked' or compute them from the indices"
        )
    known = _lowerable_primitives()
    if known is not None:
        missing = sorted(_primitives(closed.jaxpr) - known)
        if missing:
            raise NotImplementedError(
                f"the pallas kernels cannot lower the {name} operations {', '.join(missing)}"
            )


def _check_user_fns(opts: Any, bq: int, bk: int) -> None:
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    where = (i32(1, 1), i32(1, 1), i32(bq, 1), i32(1, bk))
    if opts.mask_fn is not None:
        _check_user_fn("mask_fn", opts.mask_fn, *where)
    if opts.score_fn is not None:
        score = jax.ShapeDtypeStruct((bq, bk), jnp.float32)

        def with_derivative(s, *idx):  # the backward kernels trace its derivative too
            f = lambda x: jnp.broadcast_to(opts.score_fn(x, *idx), x.shape).astype(jnp.float32)
            return jax.jvp(f, (s,), (jnp.ones_like(s),))

        _check_user_fn("score_fn", with_derivative, score, *where)


def _dims(x: Array | None) -> Dims | None:
    """Which of a dense [b, n, t, s] operand's dims the kernels index (S also when T and S are
    both broadcast: `_extra_inputs` widens it)."""
    if x is None:
        return None
    b, n, t, s = (d != 1 for d in x.shape)
    return b, n, t, s or not t


def attention(args: Any, opts: Any) -> tuple[Array, Array]:
    """Serve a normalised request (`arguments.Arguments`, `arguments.Options`) in the kernels.

    Raises NotImplementedError naming the feature for what the kernels do not implement.
    """
    interpret = interpret_mode()
    if jax.default_backend() != "gpu" and not interpret:
        raise NotImplementedError("the pallas implementation needs a GPU backend")
    unsupported = [
        ("float64", args.query.dtype == jnp.float64),
        ("head dims above 256", max(args.query.shape[-1], args.value.shape[-1]) > 256),
        (
            "64-bit segment ids",
            args.segment_ids is not None and args.segment_ids[0].dtype.itemsize > 4,
        ),
    ]
    missing = [name for name, present in unsupported if present]
    if missing:
        raise NotImplementedError(f"the pallas kernels do not implement {', '.join(missing)}")
    cfg = opts.config if opts.config is not None else PallasConfig()
    if not isinstance(cfg, PallasConfig):
        raise NotImplementedError(
            f"the pallas implementation takes a PallasConfig, got {type(cfg).__name__}"
        )
    q, k, v = args.query, args.key, args.value
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    hp, hvp = block_width(head_dim), block_width(head_dim_v)
    dense_tiles = any(d is not None and d[2] and d[3] for d in map(_dims, (args.bias, args.mask)))
    blocks = _heuristic(max(hp, hvp), q.dtype, seq_q, seq_k, cfg, dense_tiles)
    _check_user_fns(opts, blocks["block_q"], blocks["block_k"])
    tq = max(blocks["block_q"], blocks["block_q_bwd"])
    tk = max(blocks["block_k"], blocks["block_k_bwd"])
    pq, pk = -(-seq_q // tq) * tq, -(-seq_k // tk) * tk
    bias = args.bias
    bias_grad = None
    if bias is not None:
        bias = _pad_dense(bias, pq, pk, 0.0)
        cq, ck = chunked.ChunkConfig().resolve(pq, pk, batch * num_heads)
        bias_grad = chunked.Static(
            spec=masks.MaskSpec(opts.is_causal, args.local_window_size, opts.mask_fn),
            scale=args.scale,
            soft_cap=args.logits_soft_cap,
            score_fn=opts.score_fn,
            dropout_rate=opts.dropout_rate,
            broadcast_dropout=opts.broadcast_dropout,
            tq=math.gcd(pq, cq),
            tk=math.gcd(pk, ck),
            seq_k=seq_k,
            precision=opts.precision,
        )
    marr = args.mask_arrays()
    marr = marr._replace(
        q_segment_ids=None if marr.q_segment_ids is None else _pad_to(marr.q_segment_ids, 1, pq),
        kv_segment_ids=None if marr.kv_segment_ids is None else _pad_to(marr.kv_segment_ids, 1, pk),
        mask=None if marr.mask is None else _pad_dense(marr.mask, pq, pk, False),
    )
    st = Static(
        scale=args.scale,
        is_causal=opts.is_causal,
        window=args.local_window_size,
        soft_cap=args.logits_soft_cap,
        has_segments=args.segment_ids is not None,
        mask_fn=opts.mask_fn,
        score_fn=opts.score_fn,
        bias_dims=_dims(bias),
        mask_dims=_dims(marr.mask),
        has_sinks=args.sinks is not None,
        dropout_rate=opts.dropout_rate,
        broadcast_dropout=opts.broadcast_dropout,
        bias_grad=bias_grad,
        groups=num_heads // num_kv_heads,
        head_dims=(head_dim, head_dim_v),
        atomic_dq=cfg.backward == "atomic",
        precision=opts.precision,
        interpret=interpret,
        **blocks,
    )
    q_len = args.query_seq_lengths if args.query_seq_lengths is not None else seq_q
    kv_len = args.key_value_seq_lengths if args.key_value_seq_lengths is not None else seq_k
    seed = args.dropout_seed
    seed_cols = [jnp.zeros((batch,), jnp.int32)] * 2
    if seed is not None:  # the uint32 bits, carried as int32
        bits = jax.lax.bitcast_convert_type(seed.astype(jnp.uint32), jnp.int32)
        seed_cols = [jnp.broadcast_to(bits[0], (batch,)), jnp.broadcast_to(bits[1], (batch,))]
    meta = jnp.stack(
        [
            args.q_offset,
            jnp.minimum(jnp.broadcast_to(q_len, (batch,)), seq_q),
            jnp.minimum(jnp.broadcast_to(kv_len, (batch,)), seq_k),
            *seed_cols,
            *masks.relative_bounds(
                masks.MaskSpec(opts.is_causal, args.local_window_size), args.q_offset
            ),
            jnp.zeros((batch,), jnp.int32),
        ],
        axis=1,
    ).astype(jnp.int32)  # (B, 8): `META`
    qp, kp, vp = _pad_to(q, 1, pq), _pad_to(k, 1, pk), _pad_to(v, 1, pk)  # head dims: in-kernel
    out, lse = flash_attention(st, qp, kp, vp, bias, meta, marr, seed, args.sinks)
    out, lse = out[:, :seq_q], lse[:, :, :seq_q]
    if args.sinks is not None:  # padding queries (past query_seq_lengths) attend to the sink
        pad_rows = jnp.arange(seq_q)[None, None, :] >= meta[:, 1][:, None, None]
        lse = jnp.where(pad_rows, args.sinks.astype(jnp.float32)[None, :, None], lse)
    return out, lse
