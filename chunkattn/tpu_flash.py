"""Our FlashAttention kernels for TPUs (Pallas, Mosaic TPU): what splash cannot serve.

`implementation="pallas_tpu"` runs the request in three (four with a bias) Pallas TPU
kernels; `implementation=None` on a TPU tries splash first, then these, then the chunked path.
They serve everything splash does and what it declines: a dense additive bias in any shape
broadcastable to [B, N, T, S] (with its gradient), a dense boolean mask, dropout, a traced or
per-batch q_offset, a user's mask_fn / score_fn (traced into the kernel bodies); with causal /
window / lengths / segment ids, GQA, soft cap and sinks.

Layout: the kernels take q [B, N, Tp, H], k/v [B, K, Sp, H] (Tp, Sp padded to whole blocks,
multiples of the 128 lanes); a bias or mask keeps its own broadcast shape [b, n, t, s] (each
dim 1 or full; full t/s padded) and is read block by block, a size-1 dim staying size 1.

- forward, grid (B, N, Tp/bq, Sp/bk), keys innermost: the online softmax (FlashAttention-2,
  arXiv 2307.08691 Alg. 1) with m, l and the output accumulator in VMEM scratch;
  s = scale·q·kᵀ (float32) → soft cap → + bias → score_fn → mask (−inf), as
  `chunked._block_scores`. A row that sees no key ends with l = 0: output 0, lse −inf.
- dK/dV, grid (B, K, Sp/bk, G, Tp/bq): the G query heads of a kv head and the query blocks
  innermost, dK and dV accumulated in VMEM; P = exp(s − lse), dV += Pᵀ·dO, dP = dO·Vᵀ,
  dS = P ∘ (dP − D) (times score_fn′, its jvp along ones: exact for an elementwise
  function), dK += scale·dSᵀ·Q (§3.1), D = rowsum(dO∘O) − dlse from
  `summary.output_delta` (so the returned lse has its gradient).
- dQ, grid (B, N, Tp/bq, Sp/bk): dQ += scale·dS·K.
- d bias (only with a bias): the grid's axes ordered so that the bias's full dims are outer and
  its broadcast dims inner; each output block [bq|1, bk|1] stays in VMEM while the inner axes
  sum dS into it (dS reduced over the block's broadcast rows/columns). Exact, and of the
  bias's own size: a [1, N, 1, S] bias gets a [1, N, 1, S] gradient, never [B, N, T, S]. It
  recomputes the block's two products (as the dQ kernel does), so a bias costs one more pass.

Masking (index rules of masks.py): key c, row r (block-local indices are global here) are
allowed iff c < min(kv_len[b], S), r < min(q_len[b], T), lo[b] ≤ c − r ≤ hi[b]
(`masks.relative_bounds`), equal segment ids, the dense mask and mask_fn. Blocks that the
band or the lengths leave empty are skipped (`pl.when` on the scalars in SMEM; a block that
mask_fn empties is computed), and the index maps move such a step onto a block that can be
visible (`_clamp_kv`, `_clamp_q`), so its copy is skipped.
Dropout's keep-mask is `masks.dropout_keep` evaluated in the kernel from the seed (SMEM) and the
global (batch, head, row, key): the same mask as every other path for the same dropout_rng.
Sinks are merged outside the kernels (lse' = log(e^lse + e^sink), out' = out·e^(lse − lse')),
elementwise, so their gradient and the lse's follow by autodiff.

mask_fn(batch, head, q_pos, k_pos) and score_fn(s, batch, head, q_pos, k_pos) get [bq, bk]
int32 arrays at global positions (q_pos = r + q_offset[b], k_pos = c; `chunked._index_grids`),
in every kernel that computes scores (forward, dK/dV, dQ, d bias).

Declined with NotImplementedError naming the feature (`implementation=None` falls through):
a mask_fn / score_fn that closes over arrays (a score_fn's traced `score_params`) or uses an
operation the Mosaic TPU lowering lacks (`pallas.user_fns.check_user_fns`, as the GPU
kernels check theirs), float16 (no float16 matrix unit), float64, 64-bit segment ids, dot
precisions other than DEFAULT / HIGHEST, a config that is not a TpuFlashConfig. On a host
without a TPU the kernels run in the Pallas interpreter with CHUNKATTN_PALLAS_INTERPRET=1;
forced without it they still trace, so `jax.export(..., platforms=["tpu"])` lowers them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from chunkattn import masks
from chunkattn.arguments import Arguments, Options, first_order_only
from chunkattn.pallas.user_fns import check_user_fns
from chunkattn.summary import output_delta

Array = jax.Array

LANES = 128  # TPU vector lanes: blocks along T and S are multiples of this
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a·bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ·b
_NN = (((1,), (0,)), ((), ()))  # a·b


@dataclasses.dataclass(frozen=True)
class TpuFlashConfig:
    """Block sizes of the TPU flash kernels (multiples of 128; each clipped to the padded length).

    block_q / block_k tile the forward; block_q_bwd / block_k_bwd the dK/dV, dQ and d bias
    kernels (the backward holds ~4 float32 [bq, bk] blocks live, so its blocks are smaller).
    """

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int = 256
    block_k_bwd: int = 256

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % LANES:
                raise ValueError(
                    f"TpuFlashConfig.{name} must be a positive multiple of 128, got {value!r}"
                )
        for fwd, bwd in (("block_q", "block_q_bwd"), ("block_k", "block_k_bwd")):
            a, b = getattr(self, fwd), getattr(self, bwd)
            if max(a, b) % min(a, b):
                raise ValueError(
                    f"TpuFlashConfig.{fwd} and {bwd} must divide one another (the padded length "
                    f"is a multiple of both), got {a} and {b}"
                )


class _Static(NamedTuple):
    """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""

    scale: float
    soft_cap: float | None
    has_bounds: bool  # causal or window: the band lo ≤ c − r ≤ hi applies
    dropout_rate: float
    broadcast_dropout: bool
    precision: Any
    groups: int  # G = N / K
    fwd_blocks: tuple[int, int]
    bwd_blocks: tuple[int, int]
    bias_full: tuple[bool, bool, bool, bool] | None  # per dim of [b, n, t, s]: not broadcast
    mask_full: tuple[bool, bool, bool, bool] | None
    has_segments: bool
    interpret: bool
    mask_fn: Any = None  # (batch, head, q_pos, k_pos) -> bool on [bq, bk] int32 positions
    score_fn: Any = None  # (score, batch, head, q_pos, k_pos) -> score, elementwise


# ----------------------------------------------------------------------------- in-kernel parts


class _Refs(NamedTuple):
    """The optional inputs of a kernel (None when absent)."""

    bias: Any
    mask: Any
    q_seg: Any
    kv_seg: Any


def _clamp_kv(st: _Static, ints, b, i, j, bq: int, bk: int, num_k: int):
    """Key block j of query block i, moved into the blocks [first, last] that can be visible
    (`_visible` ⊆ them): a skipped step then repeats a neighbour's index and copies nothing."""
    lo, hi, q_len, kv_len = _scalars(ints, b)
    first = jnp.int32(0)
    last = jax.lax.div(jnp.maximum(kv_len - 1, 0), jnp.int32(bk))
    if st.has_bounds:  # keys c ∈ [i·bq + lo, i·bq + bq − 1 + hi] (|lo|, |hi| ≤ 2^30: no wrap)
        first = jax.lax.div(jnp.maximum(i * bq + lo, 0), jnp.int32(bk))
        last = jnp.minimum(last, jax.lax.div(jnp.maximum(i * bq + bq - 1 + hi, 0), jnp.int32(bk)))
    last = jnp.where(i * bq < q_len, jnp.maximum(last, first), first)
    return jnp.clip(jnp.clip(j, first, last), 0, num_k - 1)


def _clamp_q(st: _Static, ints, b, i, j, bq: int, bk: int, num_q: int):
    """Query block i of key block j, moved into the query blocks that can see it (as above)."""
    lo, hi, q_len, kv_len = _scalars(ints, b)
    first = jnp.int32(0)
    last = jax.lax.div(jnp.maximum(q_len - 1, 0), jnp.int32(bq))
    if st.has_bounds:  # rows r ∈ [j·bk − hi, j·bk + bk − 1 − lo]
        first = jax.lax.div(jnp.maximum(j * bk - hi, 0), jnp.int32(bq))
        last = jnp.minimum(last, jax.lax.div(jnp.maximum(j * bk + bk - 1 - lo, 0), jnp.int32(bq)))
    last = jnp.where(j * bk < kv_len, jnp.maximum(last, first), first)
    return jnp.clip(jnp.clip(i, first, last), 0, num_q - 1)


def _take_optional(st: _Static, refs: list) -> _Refs:
    """Pop the optional input refs (in the order `_optional_inputs` passes them)."""
    bias = refs.pop(0) if st.bias_full is not None else None
    mask = refs.pop(0) if st.mask_full is not None else None
    q_seg = kv_seg = None
    if st.has_segments:
        q_seg, kv_seg = refs.pop(0), refs.pop(0)
    return _Refs(bias, mask, q_seg, kv_seg)


_SCALAR_ROWS = 5  # the SMEM table's rows: lo, hi, q_len, kv_len, q_offset


def _scalars(ints, b):
    """(lo, hi, q_len, kv_len) of batch entry b from the SMEM table [5, B] (flattened)."""
    batch = ints.shape[0] // _SCALAR_ROWS
    return tuple(ints[k * batch + b] for k in range(4))


def _q_offset(ints, b):
    """q_offset of batch entry b: query row r sits at position r + q_offset (masks.py)."""
    batch = ints.shape[0] // _SCALAR_ROWS
    return ints[4 * batch + b]


def _positions(ints, b, h, rows, cols):
    """(batch, head, q_pos, k_pos) as a user's mask_fn / score_fn gets them: [bq, bk] int32,
    global positions (q_pos = row + q_offset), as `chunked._index_grids` gives them."""
    full = lambda x: jnp.full(rows.shape, x, jnp.int32)
    return full(b), full(h), rows + _q_offset(ints, b), cols


def _visible(st: _Static, ints, b, i, j, bq: int, bk: int):
    """False when the band or the lengths leave block (i, j) empty: its compute is skipped."""
    lo, hi, q_len, kv_len = _scalars(ints, b)
    ok = (i * bq < q_len) & (j * bk < kv_len)
    if st.has_bounds:  # c − r over the block spans [j·bk − (i+1)·bq + 1, (j+1)·bk − 1 − i·bq]
        ok = ok & (j * bk + bk - 1 - i * bq >= lo) & (j * bk - i * bq - bq + 1 <= hi)
    return ok


def _block_scores(st: _Static, ints, seed, b, h, i, j, q, k, opt: _Refs, bq: int, bk: int):
    """(raw, biased, s, keep) of block (i, j): raw = scale·q·kᵀ, biased = score_fn's input
    (after the soft cap and bias), s the final scores with −inf where a key may not be
    attended, keep the dropout keep-mask (None without dropout); [bq, bk]."""
    raw = jax.lax.dot_general(
        q, k, _NT, preferred_element_type=jnp.float32, precision=st.precision
    )  # (bq, bk)
    raw = raw * st.scale
    s = raw
    if st.soft_cap is not None:
        s = st.soft_cap * jnp.tanh(s / st.soft_cap)
    if opt.bias is not None:
        s = s + opt.bias[...].astype(jnp.float32)  # (bq|1, bk|1) broadcasts
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    biased = s
    if st.score_fn is not None:
        s = _apply_score_fn(st, s, _positions(ints, b, h, rows, cols))
    lo, hi, q_len, kv_len = _scalars(ints, b)
    allowed = (cols < kv_len) & (rows < q_len)
    if st.has_bounds:
        rel = cols - rows
        allowed = allowed & (rel >= lo) & (rel <= hi)
    if opt.q_seg is not None:
        q_ids = jnp.tile(opt.q_seg[...], (1, bk // LANES))  # (bq, 128) -> (bq, bk)
        kv_ids = opt.kv_seg[...][:1, :]  # (1, bk)
        allowed = allowed & (q_ids == kv_ids)
    if opt.mask is not None:
        allowed = allowed & (opt.mask[...] != 0)
    if st.mask_fn is not None:
        allowed = allowed & st.mask_fn(*_positions(ints, b, h, rows, cols))
    s = jnp.where(allowed, s, -jnp.inf)
    keep = None
    if st.dropout_rate > 0:  # the same hash as every path: global (batch, head, row, key)
        keep = masks.dropout_keep(
            (seed[0], seed[1]), b, h, rows, cols, st.dropout_rate, st.broadcast_dropout
        )
    return raw, biased, s, keep


def _apply_score_fn(st: _Static, s, pos):
    out = st.score_fn(s, *pos)
    return jnp.broadcast_to(out, s.shape).astype(jnp.float32)


def _keep_scale(st: _Static) -> float:
    return 1.0 / (1.0 - st.dropout_rate) if st.dropout_rate > 0 else 1.0


def _fwd_kernel(ints, seed, *refs, st: _Static, num_k: int):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    opt = _take_optional(st, refs)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = st.fwd_blocks

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_visible(st, ints, b, i, j, bq, bk))
    def _step():
        _, _, s, keep = _block_scores(
            st, ints, seed, b, h, i, j, q_ref[...], k_ref[...], opt, bq, bk
        )
        m_prev = m_scr[...][:, :1]  # (bq, 1)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet: exp(−inf) = 0
        p = jnp.exp(s - shift)  # (bq, bk)
        alpha = jnp.exp(m_prev - shift)
        l_new = alpha * l_scr[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
        if keep is not None:  # the denominator keeps every weight; the values see the dropped
            p = jnp.where(keep, p * _keep_scale(st), 0.0)
        v = v_ref[...]
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32, precision=st.precision
        )  # (bq, Hv)
        acc_scr[...] = alpha * acc_scr[...] + pv
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    @pl.when(j == num_k - 1)
    def _finish():
        l = l_scr[...][:, :1]
        seen = l > 0.0
        inv = 1.0 / jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_scr[...] * inv, 0.0).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l_scr[...], 1.0)), -jnp.inf)
        lse_ref[...] = lse


def _ds_block(st: _Static, ints, seed, b, h, i, j, q, k, v, do, lse, di, opt, bq, bk):
    """(p_drop, ds, ds_raw) of a block: P with dropout applied (for dV), dS w.r.t. the
    scores after the soft cap and bias (score_fn's input: for the bias) and dS w.r.t. raw
    (for dQ, dK)."""
    raw, biased, s, keep = _block_scores(st, ints, seed, b, h, i, j, q, k, opt, bq, bk)
    p = jnp.exp(s - lse)  # lse finite (a row with no key: 0), masked s = −inf gives 0
    dp = jax.lax.dot_general(
        do, v, _NT, preferred_element_type=jnp.float32, precision=st.precision
    )  # (bq, bk)
    p_drop = p
    if keep is not None:
        p_drop = jnp.where(keep, p * _keep_scale(st), 0.0)
        dp = jnp.where(keep, dp * _keep_scale(st), 0.0)
    ds = p * (dp - di)  # d loss / d (final scores)
    if st.score_fn is not None:  # elementwise: its derivative is the jvp along ones
        rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        pos = _positions(ints, b, h, rows, cols)
        _, slope = jax.jvp(
            lambda x: _apply_score_fn(st, x, pos), (biased,), (jnp.ones_like(biased),)
        )
        ds = ds * slope  # d loss / d (capped + biased scores)
    ds_raw = ds
    if st.soft_cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh²
        ds_raw = ds * (1.0 - jnp.square(jnp.tanh(raw / st.soft_cap)))
    return p_drop, ds, ds_raw


def _dkv_kernel(ints, seed, *refs, st: _Static, num_q: int):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = refs[:6]
    refs = refs[6:]
    opt = _take_optional(st, refs)
    dk_ref, dv_ref, dk_scr, dv_scr = refs
    b, kh, j, g, i = (pl.program_id(a) for a in range(5))
    h = kh * st.groups + g
    bq, bk = st.bwd_blocks

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_visible(st, ints, b, i, j, bq, bk))
    def _step():
        q, do = q_ref[...], do_ref[...]
        p_drop, _, ds_raw = _ds_block(
            st, ints, seed, b, h, i, j, q, k_ref[...], v_ref[...], do,
            lse_ref[...][:, :1], di_ref[...][:, :1], opt, bq, bk,
        )  # fmt: skip
        dv_scr[...] += jax.lax.dot_general(
            p_drop.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32,
            precision=st.precision,
        )  # (bk, Hv)  # fmt: skip
        dk_scr[...] += jax.lax.dot_general(
            (ds_raw * st.scale).astype(q.dtype), q, _TN, preferred_element_type=jnp.float32,
            precision=st.precision,
        )  # (bk, H)  # fmt: skip

    @pl.when((g == st.groups - 1) & (i == num_q - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(ints, seed, *refs, st: _Static, num_k: int):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = refs[:6]
    refs = refs[6:]
    opt = _take_optional(st, refs)
    dq_ref, dq_scr = refs
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = st.bwd_blocks

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_visible(st, ints, b, i, j, bq, bk))
    def _step():
        k = k_ref[...]
        _, _, ds_raw = _ds_block(
            st, ints, seed, b, h, i, j, q_ref[...], k, v_ref[...], do_ref[...],
            lse_ref[...][:, :1], di_ref[...][:, :1], opt, bq, bk,
        )  # fmt: skip
        dq_scr[...] += jax.lax.dot_general(
            (ds_raw * st.scale).astype(k.dtype), k, _NN, preferred_element_type=jnp.float32,
            precision=st.precision,
        )  # (bq, H)  # fmt: skip

    @pl.when(j == num_k - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dbias_kernel(ints, seed, *refs, st: _Static, order: tuple[int, ...], num_inner: int):
    """d bias: grid axes `order` (a permutation of (b, h, i, j)) with the bias's broadcast dims
    last; the output block is the same for every inner step, so dS sums into it in VMEM."""
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = refs[:6]
    refs = refs[6:]
    opt = _take_optional(st, refs)
    (db_ref,) = refs
    ids = [None] * 4
    for position, axis in enumerate(order):
        ids[axis] = pl.program_id(position)
    b, h, i, j = ids
    bq, bk = st.bwd_blocks
    inner = [pl.program_id(p) for p in range(4 - num_inner, 4)]
    first = functools.reduce(lambda a, x: a & (x == 0), inner, jnp.bool_(True))

    @pl.when(first)
    def _init():
        db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)

    @pl.when(_visible(st, ints, b, i, j, bq, bk))
    def _step():
        _, ds, _ = _ds_block(
            st, ints, seed, b, h, i, j, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
            lse_ref[...][:, :1], di_ref[...][:, :1], opt, bq, bk,
        )  # fmt: skip
        _, _, t_full, s_full = st.bias_full
        if not t_full:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if not s_full:
            ds = jnp.sum(ds, axis=1, keepdims=True)
        db_ref[...] += ds.astype(db_ref.dtype)


# ------------------------------------------------------------------------------- pallas calls


def _dense_spec(full: tuple[bool, bool, bool, bool], bq: int, bk: int, canon):
    """BlockSpec of a [b, n, t, s] bias/mask read in its own broadcast shape: a size-1 dim is
    never sliced. `canon` maps the grid's indices to (b, h, i, j)."""
    fb, fn, ft, fs = full
    shape = (None, None, bq if ft else 1, bk if fs else 1)

    def index(*idx):
        b, h, i, j = canon(*idx)
        return (b if fb else 0, h if fn else 0, i if ft else 0, j if fs else 0)

    return pl.BlockSpec(shape, index)


def _optional_inputs(st: _Static, arrays: dict, bq: int, bk: int, canon, head):
    """(arrays, specs) of the optional inputs (no arrays when `arrays` is None); `head(h, idx)`
    maps the grid's head index to the query head."""
    xs, specs = [], []
    for name, full in (("bias", st.bias_full), ("mask", st.mask_full)):
        if full is not None:
            if arrays is not None:
                xs.append(arrays[name])

            def wrap(*idx, canon=canon):
                b, h, i, j = canon(*idx)
                return b, head(h, idx), i, j

            specs.append(_dense_spec(full, bq, bk, wrap))
    if st.has_segments:
        if arrays is not None:
            xs += [arrays["q_seg"], arrays["kv_seg"]]
        specs.append(
            pl.BlockSpec((None, bq, LANES), lambda *idx: (canon(*idx)[0], canon(*idx)[2], 0))
        )
        specs.append(
            pl.BlockSpec((None, SUBLANES, bk), lambda *idx: (canon(*idx)[0], 0, canon(*idx)[3]))
        )
    return xs, specs


def _kv_head(h, groups: int):
    """The kv head of query head h (h ≥ 0): lax.div, since jnp's // lowers through sign."""
    return h if groups == 1 else jax.lax.div(h, jnp.int32(groups))


def _params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(st: _Static, q, k, v, arrays, ints, seed):
    batch, num_heads, pq, head_dim = q.shape
    pk, head_dim_v = k.shape[2], v.shape[-1]
    bq, bk = st.fwd_blocks
    grid = (batch, num_heads, pq // bq, pk // bk)
    # Key-side blocks the band or the lengths leave empty repeat a visible block's index:
    # Pallas skips the copy of a block whose index does not change.
    canon = lambda b, h, i, j, ints, *_: (b, h, i, _clamp_kv(st, ints, b, i, j, bq, bk, grid[3]))
    kv_head = lambda *idx: (canon(*idx)[0], _kv_head(idx[1], st.groups), canon(*idx)[3], 0)
    specs = [
        pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, bk, head_dim), kv_head),
        pl.BlockSpec((None, None, bk, head_dim_v), kv_head),
    ]
    xs, more = _optional_inputs(st, arrays, bq, bk, canon, lambda h, idx: h)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, num_k=grid[3]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=specs + more,
            out_specs=[
                pl.BlockSpec((None, None, bq, head_dim_v), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),  # m, broadcast over lanes
                pltpu.VMEM((bq, LANES), jnp.float32),  # l
                pltpu.VMEM((bq, head_dim_v), jnp.float32),  # output accumulator
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_heads, pq, head_dim_v), q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, pq, LANES), jnp.float32),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="chunkattn_tpu_flash_fwd",
    )(ints, seed, q, k, v, *xs)
    return out, lse[..., 0]


def _backward(st: _Static, q, k, v, arrays, ints, seed, out, lse, dout, dlse):
    batch, num_heads, pq, head_dim = q.shape
    num_kv_heads, pk, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    groups = st.groups
    bq, bk = st.bwd_blocks
    nq, nk = pq // bq, pk // bk
    # D = rowsum(dO∘O) − dlse (summary.output_delta, in [B, T, N, ·] layout); both row
    # statistics broadcast over the lanes, as the kernels read them.
    delta = output_delta(jnp.swapaxes(out, 1, 2), jnp.swapaxes(dout, 1, 2), dlse)  # (B, N, Tp)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # a row with no key: every s is −inf
    rows = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
    lse_l, delta_l = rows(lse_safe), rows(delta)
    dout = dout.astype(q.dtype)

    def q_side(canon, head):
        def spec(width):
            def index(*idx):
                b, h, i, _ = canon(*idx)
                return b, head(h, idx), i, 0

            return pl.BlockSpec((None, None, bq, width), index)

        return [spec(head_dim), spec(head_dim_v), spec(LANES), spec(LANES)]

    def kv_side(canon, kv_head):
        def spec(width):
            def index(*idx):
                b, h, _, j = canon(*idx)
                return b, kv_head(h, idx), j, 0

            return pl.BlockSpec((None, None, bk, width), index)

        return [spec(head_dim), spec(head_dim_v)]

    def inputs(canon, head, kv_head):
        qs, kvs = q_side(canon, head), kv_side(canon, kv_head)
        xs, more = _optional_inputs(st, arrays, bq, bk, canon, head)
        specs = [qs[0], kvs[0], kvs[1], qs[1], qs[2], qs[3], *more]
        return specs, [q, k, v, dout, lse_l, delta_l, *xs]

    # dK/dV: grid (b, kv head, j, g, i); "h" in canon is the kv head, the query head kh·G + g.
    canon = lambda b, kh, j, g, i, ints, *_: (b, kh, _clamp_q(st, ints, b, i, j, bq, bk, nq), j)
    q_head = lambda kh, idx: kh * groups + idx[3]
    specs, xs = inputs(canon, q_head, lambda kh, idx: kh)
    kv_out = lambda b, kh, j, g, i, *_: (b, kh, j, 0)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, num_q=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_kv_heads, nk, groups, nq),
            in_specs=specs,
            out_specs=[
                pl.BlockSpec((None, None, bk, head_dim), kv_out),
                pl.BlockSpec((None, None, bk, head_dim_v), kv_out),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, head_dim), jnp.float32),
                pltpu.VMEM((bk, head_dim_v), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=st.interpret,
        name="chunkattn_tpu_flash_dkv",
    )(ints, seed, *xs)

    # dQ: grid (b, h, i, j).
    canon = lambda b, h, i, j, ints, *_: (b, h, i, _clamp_kv(st, ints, b, i, j, bq, bk, nk))
    specs, xs = inputs(canon, lambda h, idx: h, lambda h, idx: _kv_head(h, groups))
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, num_k=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_heads, nq, nk),
            in_specs=specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
            ],
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="chunkattn_tpu_flash_dq",
    )(ints, seed, *xs)

    dbias = None
    if st.bias_full is not None:
        dbias = _bias_gradient(
            st,
            ints,
            seed,
            xs,
            arrays["bias"].shape,
            arrays["bias"].dtype,
            (batch, num_heads, nq, nk),
        )
    return dq, dk, dv, dbias


def _bias_gradient(st: _Static, ints, seed, xs, bias_shape, bias_dtype, sizes):
    """d bias in the bias's own shape (float32): grid (full dims…, broadcast dims…).

    xs are the dQ kernel's inputs (q, k, v, dO, lse, D, then the optional ones)."""
    bq, bk = st.bwd_blocks
    full = st.bias_full
    order = tuple(a for a in range(4) if full[a]) + tuple(a for a in range(4) if not full[a])
    any_inner = not all(full)

    def canon(*idx):
        ids = [None] * 4
        for position, axis in enumerate(order):
            ids[axis] = idx[position]
        return tuple(ids)

    def q_spec(width):
        return pl.BlockSpec((None, None, bq, width), lambda *idx: (*canon(*idx)[:3], 0))

    def kv_spec(width):
        def index(*idx):
            b, h, _, j = canon(*idx)
            return b, _kv_head(h, st.groups), j, 0

        return pl.BlockSpec((None, None, bk, width), index)

    head_dim, head_dim_v = xs[0].shape[-1], xs[2].shape[-1]
    specs = [q_spec(head_dim), kv_spec(head_dim), kv_spec(head_dim_v)]
    specs += [q_spec(head_dim_v), q_spec(LANES), q_spec(LANES)]
    _, more = _optional_inputs(st, None, bq, bk, canon, lambda h, idx: h)
    (dbias,) = pl.pallas_call(
        functools.partial(_dbias_kernel, st=st, order=order, num_inner=sum(not f for f in full)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=tuple(sizes[a] for a in order),
            in_specs=specs + more,
            out_specs=[_dense_spec(full, bq, bk, canon)],
        ),
        # Summed over inner steps in float32; a bias with no broadcast dim is written once.
        out_shape=[jax.ShapeDtypeStruct(bias_shape, jnp.float32 if any_inner else bias_dtype)],
        compiler_params=_params(tuple("parallel" if full[a] else "arbitrary" for a in order)),
        interpret=st.interpret,
        name="chunkattn_tpu_flash_dbias",
    )(ints, seed, *xs)
    return dbias


# ------------------------------------------------------------------------- gradient and entry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, bias, arrays, ints, seed):
    """(out [B, N, Tp, Hv], lse f32 [B, N, Tp]) with gradients for q, k, v, bias and the lse."""
    return first_order_only(functools.partial(_forward, st), "pallas_tpu")(
        q, k, v, {**arrays, "bias": bias}, ints, seed
    )


def _flash_fwd(st, q, k, v, bias, arrays, ints, seed):
    out, lse = _flash(st, q, k, v, bias, arrays, ints, seed)
    return (out, lse), (q, k, v, bias, arrays, ints, seed, out, lse)


def _flash_bwd(st, res, cotangents):
    q, k, v, bias, arrays, ints, seed, out, lse = res
    dout, dlse = cotangents
    backward = first_order_only(functools.partial(_backward, st), "pallas_tpu")
    dq, dk, dv, dbias = backward(
        q, k, v, {**arrays, "bias": bias}, ints, seed, out, lse, dout, dlse
    )
    if dbias is not None:
        dbias = dbias.astype(bias.dtype)
    no_grad = jax.tree_util.tree_map(lambda _: None, (arrays, ints, seed))
    return (dq, dk, dv, dbias, *no_grad)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _blocks(length: int, fwd: int, bwd: int) -> tuple[int, int]:
    """(forward, backward) blocks along a sequence of `length`: the config's, each clipped to
    the smallest 128·2^k that covers the sequence, and kept dividing one another."""
    cover = LANES
    while cover < length:
        cover *= 2
    fwd, bwd = min(fwd, cover), min(bwd, cover)
    if max(fwd, bwd) % min(fwd, bwd):
        fwd = bwd = min(fwd, bwd)
    return fwd, bwd


def _precision(precision: Any) -> Any:
    """The dot precision Mosaic TPU takes (DEFAULT or HIGHEST), or NotImplementedError."""
    if precision is None:
        return None
    if isinstance(precision, str):
        precision = jax.lax.Precision(precision)
    if precision == jax.lax.Precision.DEFAULT:
        return None
    if precision == jax.lax.Precision.HIGHEST:
        return precision
    raise NotImplementedError(
        f"the pallas_tpu implementation does not serve precision={precision!r} (Mosaic TPU takes "
        "DEFAULT or HIGHEST)"
    )


def _check(args: Arguments, opts: Options) -> None:
    dtype = args.query.dtype
    unsupported = [
        ("float16 (Mosaic TPU has no float16 matrix unit; use bfloat16)", dtype == jnp.float16),
        ("float64", dtype == jnp.float64),
        (
            "64-bit segment ids",
            args.segment_ids is not None and args.segment_ids[0].dtype.itemsize > 4,
        ),
    ]
    missing = [name for name, present in unsupported if present]
    if missing:
        raise NotImplementedError(
            f"the pallas_tpu implementation does not serve {', '.join(missing)}"
        )
    if opts.config is not None and not isinstance(opts.config, TpuFlashConfig):
        raise NotImplementedError(
            "the pallas_tpu implementation takes a TpuFlashConfig, got "
            f"{type(opts.config).__name__}"
        )


def _lowerable_primitives() -> set[str] | None:
    """Names of the primitives the Mosaic TPU lowering implements (None: unknown, assume all)."""
    try:
        from jax._src.pallas.mosaic import core, lowering
    except ImportError:  # pragma: no cover - private module moved
        return None
    rules = getattr(lowering, "lowering_rules", None)
    if not isinstance(rules, dict):  # pragma: no cover - the table changed shape
        return None
    tensor_core = rules.get(getattr(core.CoreType, "TC", None))
    return None if tensor_core is None else {str(p) for p in tensor_core}


def _pad_dense(x: Array, pq: int, pk: int, value: Any) -> Array:
    """A [b, n, t, s] bias/mask with its full t/s padded to the padded lengths."""
    widths = [(0, 0), (0, 0), (0, 0 if x.shape[2] == 1 else pq - x.shape[2])]
    widths.append((0, 0 if x.shape[3] == 1 else pk - x.shape[3]))
    return jnp.pad(x, widths, constant_values=value)


def _with_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
    """Merge each row with its head's sink: lse' = log(e^lse + e^sink), out' = out·e^(lse − lse').

    out [B, T, N, Hv], lse f32 [B, N, T], sinks [N] (a −inf sink is no sink). Written so that
    no branch is NaN or infinite where it is selected or differentiated.
    """
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], lse.shape)
    m = jnp.maximum(lse, sink)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.exp(lse - m_safe) + jnp.exp(sink - m_safe)  # 0 only when both are −inf
    seen = total > 0
    lse_new = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    lse_new_safe = jnp.where(seen, lse_new, 0.0)
    factor = jnp.where(jnp.isfinite(lse), jnp.exp(lse - lse_new_safe), 0.0)  # (B, N, T)
    out = out.astype(jnp.float32) * jnp.swapaxes(factor, 1, 2)[..., None]
    return out, lse_new


def attention(args: Arguments, opts: Options) -> tuple[Array, Array]:
    """Serve a normalised request: (out [B, T, N, Hv], lse f32 [B, N, T])."""
    from chunkattn.pallas.config import interpret_mode  # the same interpreter switch

    _check(args, opts)
    precision = _precision(opts.precision)
    cfg = opts.config if opts.config is not None else TpuFlashConfig()
    q, k, v = args.query, args.key, args.value
    batch, seq_q, num_heads, _ = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    (fq, bq), (fk, bk) = (
        _blocks(seq_q, cfg.block_q, cfg.block_q_bwd),
        _blocks(seq_k, cfg.block_k, cfg.block_k_bwd),
    )
    fwd, bwd = (fq, fk), (bq, bk)
    i32 = jax.ShapeDtypeStruct(fwd, jnp.int32)  # the kernels pass [bq, bk] positions
    check_user_fns(
        opts.mask_fn,
        opts.score_fn,
        (i32, i32, i32, i32),
        jax.ShapeDtypeStruct(fwd, jnp.float32),
        lowerable=_lowerable_primitives(),
        kernels="pallas_tpu",
    )
    # Padded lengths: whole blocks of both the forward and the backward (one divides the other).
    step_q, step_k = max(fq, bq), max(fk, bk)
    pq, pk = -(-seq_q // step_q) * step_q, -(-seq_k // step_k) * step_k

    arrays: dict[str, Array] = {}
    bias = None
    bias_full = mask_full = None
    if args.bias is not None:
        bias = _pad_dense(args.bias, pq, pk, 0)
        bias_full = tuple(n != 1 for n in args.bias.shape)
    if args.mask is not None:
        arrays["mask"] = _pad_dense(args.mask, pq, pk, False).astype(jnp.int8)
        mask_full = tuple(n != 1 for n in args.mask.shape)
    if args.segment_ids is not None:
        q_ids, k_ids = (s.astype(jnp.int32) for s in args.segment_ids)
        q_ids = jnp.pad(q_ids, ((0, 0), (0, pq - seq_q)))
        k_ids = jnp.pad(k_ids, ((0, 0), (0, pk - seq_k)))
        arrays["q_seg"] = jnp.broadcast_to(q_ids[:, :, None], (batch, pq, LANES))
        arrays["kv_seg"] = jnp.broadcast_to(k_ids[:, None, :], (batch, SUBLANES, pk))
    spec = masks.MaskSpec(opts.is_causal, args.local_window_size)
    lo, hi = masks.relative_bounds(spec, args.q_offset)
    q_len = seq_q if args.query_seq_lengths is None else jnp.minimum(args.query_seq_lengths, seq_q)
    kv_len = (
        seq_k if args.key_value_seq_lengths is None
        else jnp.minimum(args.key_value_seq_lengths, seq_k)
    )  # fmt: skip
    ints = jnp.concatenate(
        [
            jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))
            for x in (lo, hi, q_len, kv_len, args.q_offset)
        ]
    )  # [5·B]: lo, hi, q_len, kv_len, q_offset per batch entry (_SCALAR_ROWS)
    seed = args.dropout_seed if args.dropout_seed is not None else jnp.zeros((2,), jnp.uint32)
    st = _Static(
        scale=args.scale,
        soft_cap=args.logits_soft_cap,
        has_bounds=opts.is_causal or args.local_window_size is not None,
        dropout_rate=opts.dropout_rate,
        broadcast_dropout=opts.broadcast_dropout,
        precision=precision,
        groups=num_heads // num_kv_heads,
        fwd_blocks=fwd,
        bwd_blocks=bwd,
        bias_full=bias_full,
        mask_full=mask_full,
        has_segments=args.segment_ids is not None,
        interpret=interpret_mode(),
        mask_fn=opts.mask_fn,
        score_fn=opts.score_fn,
    )
    # [B, T, N, H] -> [B, N, Tp, H]; k, v -> [B, K, Sp, H].
    qt = jnp.pad(q, ((0, 0), (0, pq - seq_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kt, vt = (
        jnp.pad(x, ((0, 0), (0, pk - seq_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v)
    )
    out, lse = _flash(st, qt, kt, vt, bias, arrays, ints, seed)
    out = out.transpose(0, 2, 1, 3)[:, :seq_q]  # (B, T, N, Hv)
    lse = lse[:, :, :seq_q]
    if args.sinks is not None:
        out, lse = _with_sinks(out, lse, args.sinks)
    return out.astype(q.dtype), lse
