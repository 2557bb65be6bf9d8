"""The Hopper backward kernels (Pallas Mosaic GPU: wgmma, TMA, warp specialisation), EXPERIMENTAL.

`implementation="pallas_mosaic"` runs them when asked for:
`MosaicConfig(backward=MosaicBackwardConfig())`. The default pairs the Mosaic forward with the
Triton backward (`backward.py`) until these kernels have run on a GPU (issue 21).

Two kernels, each with FlashAttention-3's warpgroups (arXiv 2407.08608 §3; jax's
ops/gpu/attention_mgpu.py `_attention_bwd`, tokamax's Mosaic GPU backward): two compute
warpgroups and a memory warpgroup streaming blocks through a ring of TMA buffers (one "ready"
barrier per buffer, one "free" barrier both compute warpgroups arrive at).

- dK/dV: one program per (kv head, tile of 2·block_kv keys, batch); each compute warpgroup
  owns block_kv keys (K and V in shared memory, dK and dV in float32 registers) and the memory
  warpgroup streams the query blocks (Q, dO) that see any of the tile's keys, for every query
  head of the kv head (GQA sums in the registers, no partial outputs). Per block (transposed,
  so that the accumulators' rows are keys and P, dS are wgmma A operands from registers):
  Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, Pᵀ = 2^(Sᵀ₂ − lse₂), dV += Pᵀ·dO, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q.
- dQ (`MosaicBackwardConfig(dq="kernel")`, the default): one program per (head, tile of
  2·block_q query rows, batch), the forward's grid and schedule (`mosaic.block_schedule`); the
  memory warpgroup streams K/V blocks. Per block: S = Q·Kᵀ, dP = dO·Vᵀ, dS = P∘(dP − D),
  dQ += dS·K. 7 matrix products per block pair in all.
- Or dQ in the dK/dV kernel (`dq="atomic"`, FA3's structure, arXiv 2407.08608 §3.3; 5
  products): each compute warpgroup writes its dSᵀ to shared memory (two steps' buffers) and
  computes dQ = dS·K for the block ([64 rows, 64 columns] float32, transient), which a TMA
  reduce-add adds to a zeroed float32 [B, Tp, N, H] accumulator in global memory (a JAX Ref the
  kernel writes in place; `mosaic_compat.kernel`); scale and cast after the kernel. At H=64 a
  warpgroup adds its own dS·K over its keys; at H=128 (a [64, 128] accumulator would take 64
  registers) the two split dQ's columns, FA3's hdim-128 split: warpgroup w adds
  dQ[:, 64w:64w+64] = Σ_u dS_u·K_u[:, 64w:64w+64] over both warpgroups' dS, which meet once
  per block at a barrier. The Mosaic GPU interpreter has no TMA reduction ("reduction_op not
  supported", jax 0.11.2 and 0.12.0.1): under it `mosaic_compat.reduce_add_to_gmem` reads,
  adds and writes back (at H=64 warpgroup 1 after 0), so the kernel's algebra, barriers and
  schedule run on the CPU; the reduction itself is checked only on a GPU. Registers
  (bench/NOTES.md v15, v17): no spill at any head dim since the loop reads K and V at a
  traced index 0 (their wgmma descriptors computed per step, not hoisted: hoisted, H=128
  spilled 368-676 B); "kernel" stays the default until a GPU has timed both.

D = rowsum(dO∘O) − dlse is `summary.output_delta` (exact float32); lse₂ is the residual lse in
the log2 domain, +inf for a row that saw no key (P = 0). Masks are the forward's per-row key
ranges (`mosaic.key_ranges`); for dK/dV `q_block_schedule` turns them into, per key tile, the
query blocks [lo, hi) that see any of its keys and, per compute warpgroup, the blocks
[flo, fhi) whose rows all see its keys whole (no mask arithmetic): causal skips every block
above the diagonal. The sinks' gradient is `chunked.sink_gradient` of the residuals
(dispatch.py), as with the Triton backward.

Serves what the forward serves at head dims 64 and 128 (q/k and v each): bf16/f16, GQA,
causal, window, q_offset, lengths, segment ids, soft cap, sinks, the lse's cotangent. Head
dim 256 raises NotImplementedError (dK and dV alone would be 256 registers per thread).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from chunkattn.pallas import mosaic
from chunkattn.pallas.kernel_common import F32_MAX, LOG2E, segment_ranges, three_phase
from chunkattn.summary import output_delta

Array = jax.Array

HEAD_DIMS = (64, 128)
COMPUTE_WGS = mosaic.COMPUTE_WGS
DQ_FORMS = ("kernel", "atomic")
DQ_COLS = 64  # the atomic form's dQ columns per compute warpgroup at H=128 (and all of H=64)
SMEM_BUDGET = mosaic.SMEM_LIMIT - 4096  # the buffers' share: Mosaic adds ~2.6 KB of its own


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
    """Blocks of the Mosaic GPU backward kernels (`MosaicConfig(backward=...)`).

    block_q: query rows per streamed block of the dK/dV kernel (the N of Sᵀ = K·Qᵀ).
    block_kv: key rows per compute warpgroup of the dK/dV kernel (wgmma's M: 64); a program
      holds two, a tile of 2·block_kv keys.
    block_k_dq: key rows per streamed block of the dQ kernel (its query rows per compute
      warpgroup are 64, as the forward's).
    num_stages: buffers in each kernel's TMA ring.
    dq: "kernel": dQ by its own kernel (S and dP computed again: 7 matrix products per block
      pair); "atomic": in the dK/dV kernel, FA3's form (5 products), each block's dQ added to
      a float32 accumulator in global memory by TMA reduce-adds (needs block_q=64). "kernel"
      stays the default until a GPU has timed both.
    """

    block_q: int = 64
    block_kv: int = 64
    block_k_dq: int = 64
    num_stages: int = 2
    dq: str = "kernel"

    def __post_init__(self):
        if self.block_q not in (64, 128):
            raise ValueError(
                f"MosaicBackwardConfig.block_q must be 64 or 128, got {self.block_q!r}"
            )
        if self.block_kv != 64:
            raise ValueError(f"MosaicBackwardConfig.block_kv must be 64, got {self.block_kv!r}")
        if self.block_k_dq not in (64, 128):
            raise ValueError(
                f"MosaicBackwardConfig.block_k_dq must be 64 or 128, got {self.block_k_dq!r}"
            )
        if not (isinstance(self.num_stages, int) and 2 <= self.num_stages <= 4):
            raise ValueError(
                f"MosaicBackwardConfig.num_stages must be in 2..4, got {self.num_stages!r}"
            )
        if self.dq not in DQ_FORMS:
            raise ValueError(f"MosaicBackwardConfig.dq must be one of {DQ_FORMS}, got {self.dq!r}")
        if self.dq == "atomic" and self.block_q != 64:
            raise ValueError(
                "MosaicBackwardConfig(dq='atomic') needs block_q=64 (its dS and dQ buffers in "
                f"shared memory), got block_q={self.block_q!r}"
            )


class BwdPlan(NamedTuple):
    """The backward's static part of a `mosaic.Plan` (hashable)."""

    block_q: int  # dK/dV: query rows per streamed block
    block_kv: int  # dK/dV: keys per compute warpgroup
    block_k_dq: int  # dQ: keys per streamed block
    num_stages: int
    dq: str = "kernel"  # "kernel" or "atomic" (`MosaicBackwardConfig.dq`)


def plan_for(cfg: MosaicBackwardConfig) -> BwdPlan:
    return BwdPlan(cfg.block_q, cfg.block_kv, cfg.block_k_dq, cfg.num_stages, cfg.dq)


def unsupported_features(head_dims: tuple[int, int]) -> list[str]:
    """What the backward kernels do not implement beyond what the forward refuses."""
    h, hv = head_dims
    if h in HEAD_DIMS and hv in HEAD_DIMS:
        return []
    return [f"head dims {h}/{hv} in the Mosaic backward (it takes 64 and 128)"]


def padding(bp: BwdPlan) -> tuple[int, int]:
    """(query, key) multiples the backward's inputs are padded to."""
    return max(COMPUTE_WGS * 64, bp.block_q), max(COMPUTE_WGS * bp.block_kv, bp.block_k_dq)


def smem_bytes(
    kernel: str, head_dims: tuple[int, int], itemsize: int, bp: BwdPlan, interpret: bool = False
) -> int:
    """Shared memory of the buffers of `kernel` ("dq" or "dkdv"); Mosaic adds ~2.6 KB."""
    h, hv = head_dims
    stages = bp.num_stages
    if kernel == "dq":
        total = COMPUTE_WGS * 64 * (h + hv) * itemsize  # Q and dO per warpgroup
        total += stages * bp.block_k_dq * (h + hv) * itemsize  # the K/V ring
        if interpret:
            total += COMPUTE_WGS * 64 * bp.block_k_dq * itemsize  # dS
        return total
    total = COMPUTE_WGS * bp.block_kv * (h + hv) * itemsize  # K and V per warpgroup
    total += stages * bp.block_q * ((h + hv) * itemsize + 2 * 4 + 3 * 4)  # Q, dO, rows' values
    if interpret:
        total += COMPUTE_WGS * bp.block_kv * bp.block_q * itemsize  # Pᵀ, then dSᵀ
    if bp.dq == "atomic":
        total += 2 * COMPUTE_WGS * bp.block_kv * bp.block_q * itemsize  # dSᵀ, two steps' worth
        total += COMPUTE_WGS * bp.block_q * DQ_COLS * 4  # each warpgroup's float32 dQ
    return total


# ------------------------------------------------------------ the parts (checkable on the CPU)


def q_block_schedule(
    kstart: Array,
    kend: Array,
    seq_k: int,
    block_q: int,
    block_kv: int,
    seg_range: Array | None = None,
) -> Array:
    """int32 [B, tiles, 8]: per key tile of 2·block_kv keys, (lo, hi, flo₀, fhi₀, flo₁, fhi₁,
    0, 0) over query blocks of block_q rows, from the per-row key ranges [kstart_r, kend_r).

    [lo, hi): from the first to the last query block one of whose rows sees a key of the tile
    (within `seg_range`, the blocks whose segment ids can meet the tile's). [flo_w, fhi_w) ⊆
    [lo, hi): a run of blocks each of whose rows sees all of warpgroup w's keys
    [k₀, k₀ + block_kv) (kstart_r ≤ k₀ and k₀ + block_kv ≤ kend_r), which need no mask (none
    with segment ids). A tile no row sees gets [0, 0).
    """
    batch, seq_q = kstart.shape
    nq, tiles = seq_q // block_q, seq_k // (COMPUTE_WGS * block_kv)
    ks = kstart.reshape(batch, 1, nq, block_q)
    ke = kend.reshape(batch, 1, nq, block_q)
    nonempty = ke > ks
    first = jnp.min(jnp.where(nonempty, ks, jnp.iinfo(jnp.int32).max), axis=3)  # (B, 1, nq)
    last = jnp.max(jnp.where(nonempty, ke, 0), axis=3)
    t0 = (jnp.arange(tiles, dtype=jnp.int32) * (COMPUTE_WGS * block_kv))[None, :, None]
    meets = (first < t0 + COMPUTE_WGS * block_kv) & (last > t0)  # (B, tiles, nq)
    idx = jnp.arange(nq, dtype=jnp.int32)
    hi = jnp.max(jnp.where(meets, idx + 1, 0), axis=2)  # (B, tiles)
    lo = jnp.minimum(jnp.min(jnp.where(meets, idx, nq), axis=2), hi)
    if seg_range is not None:
        lo, hi = jnp.maximum(lo, seg_range[..., 0]), jnp.minimum(hi, seg_range[..., 1])
    hi = jnp.maximum(hi, lo)
    cols = [lo[..., None], hi[..., None]]
    all_lo, all_hi = jnp.max(ks, axis=3), jnp.min(ke, axis=3)  # every row sees [all_lo, all_hi)
    for w in range(COMPUTE_WGS):
        k0 = t0 + w * block_kv
        full = (all_lo <= k0) & (k0 + block_kv <= all_hi)  # (B, tiles, nq)
        flo = jnp.min(jnp.where(full, idx, nq), axis=2)
        fhi = jnp.min(jnp.where(~full & (idx > flo[..., None]), idx, nq), axis=2)
        if seg_range is not None:
            flo = fhi = lo
        flo = jnp.clip(flo, lo, hi)
        fhi = jnp.clip(fhi, flo, hi)
        cols += [flo[..., None], fhi[..., None]]
    zero = jnp.zeros_like(cols[0])
    return jnp.concatenate([*cols, zero, zero], axis=-1).astype(jnp.int32)


def block_grads(raw, dp, lse2, delta, plan: mosaic.Plan, mask=None):
    """(P, dS) of one block [bq, bk] from raw = q·kᵀ and dp = dO·vᵀ (float32).

    P = 2^(s₂ − lse₂) with s₂ the log2-domain score (`mosaic.score_block`) and lse₂ per row
    (+inf: the row saw no key, P = 0); dS = P∘(dP − D) with D per row, times 1 − t² with a
    soft cap (d cap·tanh(x/cap)/dx, t = s₂/(cap·log₂e)), taken before the mask so that a
    masked score (−inf) meets P = 0, never ∞·0. `mask(s₂)` sets the disallowed scores to −inf.
    dS is the gradient of scale·q·kᵀ: dQ = scale·dS·K, dK = scale·dSᵀ·Q.
    """
    s = mosaic.score_block(raw, plan.scale, plan.soft_cap)
    slope = None
    if plan.soft_cap is not None:
        t = s * (1.0 / (plan.soft_cap * LOG2E))
        slope = 1.0 - t * t
    if mask is not None:
        s = mask(s)
    rows = lambda x: lax.broadcast_in_dim(x, s.shape, [0])  # noqa: E731
    p = jnp.exp2(s - rows(lse2))
    ds = p * (dp - rows(delta))
    return p, (ds if slope is None else ds * slope)


def mask_block_t(s, keys, kstart, kend, segk=None, segq=None):
    """s [bkv, bq] (keys × rows, the dK/dV kernel's transposed block) with −inf where row c
    may not see key keys[k]: outside [kstart_c, kend_c), or (segment ids) segq_c ≠ segk_k.
    keys and segk are [bkv] (one value per row of the block: 2 registers a thread, where a
    [bkv, bq] index array would take 32), kstart/kend/segq [bq]."""
    col = lambda x: lax.broadcast_in_dim(x, s.shape, [1])  # noqa: E731
    keys = lax.broadcast_in_dim(keys, s.shape, [0])
    ok = (keys >= col(kstart)) & (keys < col(kend))
    if segq is not None:
        ok = ok & (lax.broadcast_in_dim(segk, s.shape, [0]) == col(segq))
    return jnp.where(ok, s, -jnp.inf)


def block_grads_t(raw_t, dp_t, lse2, delta, plan: mosaic.Plan, mask_t=None):
    """`block_grads` of the transposed block (keys × rows, the dK/dV kernel's): (Pᵀ, dSᵀ) from
    raw_t = k·qᵀ and dp_t = v·dOᵀ, with lse₂ and D per column."""
    p, slope = probs_t(raw_t, lse2, plan, mask_t)
    return p, dscores_t(p, dp_t, delta, slope)


def probs_t(raw_t, lse2, plan: mosaic.Plan, mask_t=None):
    """(Pᵀ, slope) of `block_grads_t`: 2^(sᵀ₂ − lse₂), and 1 − t² with a soft cap (else None)."""
    s = mosaic.score_block(raw_t, plan.scale, plan.soft_cap)
    slope = None
    if plan.soft_cap is not None:
        t = s * (1.0 / (plan.soft_cap * LOG2E))
        slope = 1.0 - t * t
    if mask_t is not None:
        s = mask_t(s)
    return jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [1])), slope


def cap_slope(p_t, lse2, cap: float):
    """The soft cap's 1 − t² recomputed from Pᵀ (0 where P = 0): s₂ = log₂P + lse₂ = cap·log₂e·t.

    The dK/dV kernel takes it so after the dV wgmma instead of holding it (32 registers a
    thread) across; a masked or underflowed weight gives dS = 0 whatever its slope."""
    s2 = jnp.log2(p_t) + lax.broadcast_in_dim(lse2, p_t.shape, [1])
    t = s2 * (1.0 / (cap * LOG2E))
    return jnp.where(p_t > 0, 1.0 - t * t, 0.0)


def dscores_t(p_t, dp_t, delta, slope=None):
    """dSᵀ = Pᵀ∘(dPᵀ − D)(·slope) of `block_grads_t`, D per column."""
    ds = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
    return ds if slope is None else ds * slope


class BwdInputs(NamedTuple):
    """The kernels' inputs besides q, k, v, dO (`inputs_for`)."""

    lse2: Array  # float32 [B, N, Tp]: log2-domain lse, +inf for a row that saw no key
    delta: Array  # float32 [B, N, Tp]: D = rowsum(dO∘O) − dlse
    kstart: Array  # int32 [B, Tp]: `mosaic.key_ranges`
    kend: Array  # int32 [B, Tp]
    sched_dq: Array | None  # int32 [B, q tiles, 8]: `mosaic.block_schedule` (None: atomic dQ)
    sched_kv: Array  # int32 [B, kv tiles, 8]: `q_block_schedule`
    segq: Array | None  # int32 [B, Tp]
    segk: Array | None  # int32 [B, Sp]


def schedules(plan: mosaic.Plan, meta, seq_q: int, seq_k: int, q_seg, kv_seg):
    """(kstart, kend, sched_dq, sched_kv, segq, segk): both kernels' schedules."""
    bp = plan.backward
    kstart, kend = mosaic.key_ranges(meta, seq_q, seq_k)
    segq = segk = None
    seg_q = seg_k = None
    if plan.has_segments:
        segq, segk = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
        q_len, kv_len = meta[:, 1], meta[:, 2]
        if bp.dq == "kernel":
            seg_q = segment_ranges(segq, segk, q_len, kv_len, COMPUTE_WGS * 64, bp.block_k_dq, "q")
        seg_k = segment_ranges(
            segq, segk, q_len, kv_len, bp.block_q, COMPUTE_WGS * bp.block_kv, "k"
        )
    sched_dq = None
    if bp.dq == "kernel":
        sched_dq = mosaic.block_schedule(kstart, kend, 64, bp.block_k_dq, seg_q)
    sched_kv = q_block_schedule(kstart, kend, seq_k, bp.block_q, bp.block_kv, seg_k)
    return kstart, kend, sched_dq, sched_kv, segq, segk


def inputs_for(plan: mosaic.Plan, meta, q_seg, kv_seg, out, lse, dout, dlse, seq_k) -> BwdInputs:
    """Everything the kernels read besides q, k, v and dO (`BwdInputs`)."""
    no_key = ~jnp.isfinite(lse) | (lse >= F32_MAX)  # −inf, or the residual's F32_MAX
    lse2 = jnp.where(no_key, jnp.inf, lse * LOG2E)
    delta = output_delta(out, dout, dlse)
    parts = schedules(plan, meta, out.shape[1], seq_k, q_seg, kv_seg)
    return BwdInputs(lse2, delta, *parts)


def emulate_dq(plan: mosaic.Plan, q, k, v, do, inp: BwdInputs):
    """The dQ kernel's loops in plain jnp (dQ [B, Tp, N, H] in q's dtype), one (batch, head,
    tile, warpgroup) program at a time under vmap."""
    batch, seq_q, heads, _ = q.shape
    bq, bk = 64, plan.backward.block_k_dq
    tiles = seq_q // (COMPUTE_WGS * bq)

    def program(b, n, t, w):
        q_base = (t * COMPUTE_WGS + w) * bq
        rows = lambda x: lax.dynamic_slice_in_dim(x, q_base, bq)  # noqa: E731
        qb, dob = rows(q[b, :, n]), rows(do[b, :, n])
        kh, vh = k[b, :, n // plan.groups], v[b, :, n // plan.groups]
        lse2, delta = rows(inp.lse2[b, n]), rows(inp.delta[b, n])
        ks, ke = rows(inp.kstart[b]), rows(inp.kend[b])
        sq = rows(inp.segq[b]) if plan.has_segments else None
        lo, hi = inp.sched_dq[b, t, 0], inp.sched_dq[b, t, 1]
        flo, fhi = inp.sched_dq[b, t, 2 + 2 * w], inp.sched_dq[b, t, 3 + 2 * w]

        def step(j, dq, masked):
            kb = lax.dynamic_slice_in_dim(kh, j * bk, bk)
            vb = lax.dynamic_slice_in_dim(vh, j * bk, bk)
            raw = jnp.dot(qb, kb.T, preferred_element_type=jnp.float32)
            dp = jnp.dot(dob, vb.T, preferred_element_type=jnp.float32)
            mask = None
            if masked:
                cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
                sk = lax.dynamic_slice_in_dim(inp.segk[b], j * bk, bk) if sq is not None else None
                mask = functools.partial(mosaic.mask_block, cols=cols, kstart=ks, kend=ke)
                mask = functools.partial(mask, segq=sq, segk=sk)
            _, ds = block_grads(raw, dp, lse2, delta, plan, mask)
            return dq + jnp.dot(ds.astype(q.dtype), kb, preferred_element_type=jnp.float32)

        dq = three_phase(lo, flo, fhi, hi, step, jnp.zeros((bq, q.shape[-1]), jnp.float32))
        return (dq * plan.scale).astype(q.dtype)

    idx = _grid(batch, heads, tiles)
    dq = jax.vmap(lambda i: program(*i))(idx)  # (programs, bq, H)
    dq = dq.reshape(batch, heads, seq_q, -1)
    return dq.transpose(0, 2, 1, 3)


def emulate_dkdv(plan: mosaic.Plan, q, k, v, do, inp: BwdInputs):
    """The dK/dV kernel's loops in plain jnp ((dK [B, Sp, K, H], dV [B, Sp, K, Hv]) in k's
    dtype), one (batch, kv head, tile, warpgroup) program at a time under vmap. With atomic dQ
    also dQ [B, Tp, N, H] in q's dtype: each program's float32 dS·K per query block, summed
    over the programs as the kernel's reduce-adds sum them (another order)."""
    batch, seq_k, kv_heads, _ = k.shape
    bp = plan.backward
    bq, bkv, g = bp.block_q, bp.block_kv, plan.groups
    tiles = seq_k // (COMPUTE_WGS * bkv)
    atomic = bp.dq == "atomic"

    def program(b, kh, t, w):
        k_base = (t * COMPUTE_WGS + w) * bkv
        kb = lax.dynamic_slice_in_dim(k[b, :, kh], k_base, bkv)
        vb = lax.dynamic_slice_in_dim(v[b, :, kh], k_base, bkv)
        sk = lax.dynamic_slice_in_dim(inp.segk[b], k_base, bkv) if plan.has_segments else None
        lo, hi = inp.sched_kv[b, t, 0], inp.sched_kv[b, t, 1]
        flo, fhi = inp.sched_kv[b, t, 2 + 2 * w], inp.sched_kv[b, t, 3 + 2 * w]
        keys = k_base + jnp.arange(bkv, dtype=jnp.int32)

        def head(gi, carry):
            n = kh * g + gi

            def step(i, carry, masked):
                dk, dv, dq = carry
                rows = lambda x: lax.dynamic_slice_in_dim(x, i * bq, bq)  # noqa: E731
                qb, dob = rows(q[b, :, n]), rows(do[b, :, n])
                raw = jnp.dot(kb, qb.T, preferred_element_type=jnp.float32)  # Sᵀ (bkv, bq)
                dp = jnp.dot(vb, dob.T, preferred_element_type=jnp.float32)  # dPᵀ
                mask = None
                if masked:
                    sq = rows(inp.segq[b]) if sk is not None else None
                    mask = functools.partial(
                        mask_block_t,
                        keys=keys,
                        kstart=rows(inp.kstart[b]),
                        kend=rows(inp.kend[b]),
                        segk=sk,
                        segq=sq,
                    )
                lse2, delta = rows(inp.lse2[b, n]), rows(inp.delta[b, n])
                p, ds = block_grads_t(raw, dp, lse2, delta, plan, mask)
                ds = ds.astype(q.dtype)
                dv = dv + jnp.dot(p.astype(q.dtype), dob, preferred_element_type=jnp.float32)
                dk = dk + jnp.dot(ds, qb, preferred_element_type=jnp.float32)
                if atomic:  # dQ += dS·K (bq, H) into this head's rows
                    part = jnp.dot(ds.T, kb, preferred_element_type=jnp.float32)
                    old = lax.dynamic_slice(dq, (gi, i * bq, 0), (1, bq, part.shape[1]))
                    dq = lax.dynamic_update_slice(dq, old + part[None], (gi, i * bq, 0))
                return dk, dv, dq

            return three_phase(lo, flo, fhi, hi, step, carry)

        init = (
            jnp.zeros((bkv, k.shape[-1]), jnp.float32),
            jnp.zeros((bkv, v.shape[-1]), jnp.float32),
            jnp.zeros((g, q.shape[1], q.shape[-1]) if atomic else (0,), jnp.float32),
        )
        dk, dv, dq = lax.fori_loop(0, g, head, init)
        return (dk * plan.scale).astype(k.dtype), dv.astype(v.dtype), dq

    idx = _grid(batch, kv_heads, tiles)
    dk, dv, dq = jax.vmap(lambda i: program(*i))(idx)  # (programs, bkv, H)
    fix = lambda x: x.reshape(batch, kv_heads, seq_k, -1).transpose(0, 2, 1, 3)  # noqa: E731
    if not atomic:
        return fix(dk), fix(dv)
    seq_q, h = q.shape[1], q.shape[-1]
    dq = dq.reshape(batch, kv_heads, tiles * COMPUTE_WGS, g, seq_q, h).sum(axis=2)
    dq = dq.reshape(batch, kv_heads * g, seq_q, h).transpose(0, 2, 1, 3)  # (B, Tp, N, H)
    return fix(dk), fix(dv), (dq * plan.scale).astype(q.dtype)


def _grid(batch: int, heads: int, tiles: int) -> Array:
    """int32 [programs, 4]: (batch, head, tile, warpgroup) in the kernels' output order."""
    axes = (jnp.arange(batch), jnp.arange(heads), jnp.arange(tiles), jnp.arange(COMPUTE_WGS))
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)


def emulate(plan: mosaic.Plan, q, k, v, do, inp: BwdInputs):
    """(dQ, dK, dV) by `emulate_dq` and `emulate_dkdv` (what `launch` returns); with atomic dQ
    by `emulate_dkdv` alone."""
    if plan.backward.dq == "atomic":
        dk, dv, dq = emulate_dkdv(plan, q, k, v, do, inp)
        return dq, dk, dv
    dk, dv = emulate_dkdv(plan, q, k, v, do, inp)
    return emulate_dq(plan, q, k, v, do, inp), dk, dv


def backward(plan: mosaic.Plan, q, k, v, meta, q_seg, kv_seg, out, lse, dout, dlse):
    """(dQ, dK, dV) of inputs padded to whole tiles (`padding`), from the forward's residuals
    (out, lse natural with F32_MAX for a row that saw no key) and the cotangents."""
    dims, bp = plan.head_dims, plan.backward
    if (need := smem_bytes("dkdv", dims, q.dtype.itemsize, bp, plan.interpret)) > SMEM_BUDGET:
        raise NotImplementedError(
            f"the Mosaic backward's dK/dV kernel at head dims {dims[0]}/{dims[1]} with {bp} "
            f"needs {need} B of shared memory (at most {SMEM_BUDGET}): fewer num_stages"
        )
    from chunkattn.pallas import mosaic_compat as compat

    inp = inputs_for(plan, meta, q_seg, kv_seg, out, lse, dout, dlse, k.shape[1])
    launch_plan = functools.partial(launch, plan)
    return compat.skips_empty_maps(launch_plan)(q, k, v, dout.astype(q.dtype), inp)


# ------------------------------------------------------------------------------- the kernels


def _dq_kernel(*refs, plan: mosaic.Plan):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from chunkattn.pallas import mosaic_compat as compat

    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kstart_ref, kend_ref, sched_ref = refs[:9]
    rest = refs[9:]
    segq_ref = segk_ref = None
    if plan.has_segments:
        segq_ref, segk_ref = rest.pop(0), rest.pop(0)
    dq_ref, smem, barriers = rest
    q_smem2, do_smem2, k_smem, v_smem, ds_smem2 = smem
    k_ready, v_ready, q_ready, do_ready, k_free, v_free = barriers

    bq, bk, stages = 64, plan.backward.block_k_dq, plan.backward.num_stages
    dtype = q_ref.dtype
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    t = lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    lo, hi = sched_ref[b, t, 0], sched_ref[b, t, 1]

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        if not plan.interpret:
            plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        ds_smem = None if ds_smem2 is None else ds_smem2.at[wg]
        flo, fhi = sched_ref[b, t, 2 + 2 * wg], sched_ref[b, t, 3 + 2 * wg]
        rows = pl.ds((t * COMPUTE_WGS + wg) * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, do_ready.at[wg])
        lse2 = compat.load(lse_ref.at[b, h, rows], compat.ROW)
        delta = compat.load(delta_ref.at[b, h, rows], compat.ROW)
        kstart = compat.load(kstart_ref.at[b, rows], compat.ROW)
        kend = compat.load(kend_ref.at[b, rows], compat.ROW)
        segq = compat.load(segq_ref.at[b, rows], compat.ROW) if plan.has_segments else None
        dq0 = plgpu.layout_cast(jnp.zeros((bq, plan.head_dims[0]), jnp.float32), compat.WGMMA)
        plgpu.barrier_wait(q_ready.at[wg])
        plgpu.barrier_wait(do_ready.at[wg])

        def step(j, dq, masked):
            slot = lax.rem(j - lo, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            raw, dp = compat.mma_pair(
                (q_smem, compat.transpose(k_smem.at[slot])),
                (do_smem, compat.transpose(v_smem.at[slot])),
                (bq, bk),
            )
            plgpu.barrier_arrive(v_free.at[slot])
            mask = None
            if masked:
                cols = j * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=compat.WGMMA)
                segk = None
                if plan.has_segments:
                    segk = compat.load(segk_ref.at[b, pl.ds(j * bk, bk)], compat.COL)
                mask = functools.partial(
                    mosaic.mask_block, cols=cols, kstart=kstart, kend=kend, segq=segq, segk=segk
                )
            _, ds = block_grads(raw, dp, lse2, delta, plan, mask)
            dq = compat.mma_accumulate(dq, ds.astype(dtype), k_smem.at[slot], ds_smem)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = three_phase(lo, flo, fhi, hi, step, dq0)
        q_smem[...] = (dq * plan.scale).astype(dtype)  # Q's buffer is free by now
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        if not plan.interpret:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, jnp.asarray(plan.groups, h.dtype))

        def copy(src, dst, ready):
            def issue(gi, j, slot):
                keys = pl.ds(j * bk, bk)
                plgpu.copy_gmem_to_smem(src.at[b, keys, kv_head], dst.at[slot], ready.at[slot])

            return issue

        streams = [(copy(k_ref, k_smem, k_ready), k_free), (copy(v_ref, v_smem, v_ready), v_free)]
        _stream(1, lo, hi, streams, stages)


def _dkdv_kernel(*refs, plan: mosaic.Plan):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from chunkattn.pallas import mosaic_compat as compat

    bp = plan.backward
    atomic = bp.dq == "atomic"
    # Atomic dQ at H=128: each compute warpgroup takes half of dQ's columns over both
    # warpgroups' keys, dQ[:, half] = Σ_u dS_u·K_u[:, half] (FA3's hdim-128 split: a [64, 64]
    # float32 accumulator, not [64, 128]), so both dS go through shared memory and the
    # warpgroups meet once per block. At H=64 each adds its own dS·K (no meeting).
    split = atomic and plan.head_dims[0] == COMPUTE_WGS * DQ_COLS
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, stats_ref, ranges_ref, sched_ref = refs[:7]
    del refs[:7]
    segk_ref = refs.pop(0) if plan.has_segments else None
    dq_ref = refs.pop(0) if atomic else None  # float32 [B, Tp, N, H], zeroed, added to
    dk_ref, dv_ref, smem, barriers = refs
    k_smem2, v_smem2, q_smem, do_smem, stats_smem, ranges_smem, p_smem2, ds_smem2, dq_smem2 = smem
    q_ready, do_ready, stats_ready, ranges_ready, k_ready, v_ready, q_free, do_free = barriers[:8]
    ds_ready, kv_done, dq_io, dq_turn = barriers[8:]

    bq, bkv, stages, g = bp.block_q, bp.block_kv, bp.num_stages, plan.groups
    dtype = q_ref.dtype
    b = lax.axis_index("batch")
    kh = lax.axis_index("heads")  # the kv head
    t = lax.axis_index("kv_seq")
    wg_index = lax.axis_index("wg")

    def _compute(wg: int):  # compute warpgroup wg (static: its buffers' addresses are constants)
        if not plan.interpret:
            plgpu.set_max_registers(240, action="increase")
        # Read after setmaxnreg: a value live across it is spilled (ptxas, 8 B). The loops
        # count ring steps, not query blocks (only the memory warpgroup needs those): the
        # phases' bounds are relative to lo, and lo is not live in them.
        lo, hi = sched_ref[b, t, 0], sched_ref[b, t, 1]
        nb = hi - lo  # query blocks per query head
        if atomic:  # [1, bkv, H] buffers: the loop reads them at an index it computes (below)
            k_smem, v_smem = k_smem2[wg].at[0], v_smem2[wg].at[0]
        else:
            k_smem, v_smem = k_smem2[wg], v_smem2[wg]
        p_smem = None if p_smem2 is None else p_smem2[wg]
        n_flo = sched_ref[b, t, 2 + 2 * wg] - lo
        n_fhi = sched_ref[b, t, 3 + 2 * wg] - lo
        k_base = (t * COMPUTE_WGS + wg) * bkv
        keys = pl.ds(k_base, bkv)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kh], k_smem, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kh], v_smem, v_ready.at[wg])
        segk = compat.load(segk_ref.at[b, keys], compat.ROW) if plan.has_segments else None
        zeros = lambda d: plgpu.layout_cast(jnp.zeros((bkv, d), jnp.float32), compat.WGMMA)  # noqa: E731
        carry = (zeros(plan.head_dims[0]), zeros(plan.head_dims[1]))
        for u in range(COMPUTE_WGS) if split else (wg,):  # dQ reads the other's K too
            plgpu.barrier_wait(k_ready.at[u])
        plgpu.barrier_wait(v_ready.at[wg])

        def head(gi, carry):  # query head kh·g + gi (the ring carries its blocks)
            def step(n, carry, masked):  # ring step n: query block lo + n − gi·nb
                dk, dv = carry
                slot = lax.rem(n, stages)
                # Atomic: K and V at index n >> 30 (0: n < 2^30, which LLVM cannot prove), so
                # their wgmma descriptors are computed per step, not hoisted out of the loop
                # as constants. Hoisted, the loop-invariant descriptors of Sᵀ = K·Qᵀ,
                # dPᵀ = V·dOᵀ and dQ's K took registers through the loop and ptxas spilled
                # 368-676 B at H=128 (bench/NOTES.md v15, v17); per step: 0 B.
                zero = lax.shift_right_logical(n, 30) if atomic else None

                def k_at(u):  # compute warpgroup u's K block
                    return k_smem2[u] if zero is None else k_smem2[u].at[zero]

                v_at = v_smem if zero is None else v_smem2[wg].at[zero]
                # As jax's attention_mgpu.py: the transposed block (keys × rows), so that P
                # and dS are wgmma A operands from registers; the per-row values (lse₂, D, key
                # ranges) come through the TMA ring with Q, one value per column.
                col = lambda ref: compat.load(ref, compat.COL)  # noqa: E731
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(stats_ready.at[slot])
                plgpu.barrier_wait(ranges_ready.at[slot])
                raw = compat.mma(k_at(wg), compat.transpose(q_smem.at[slot]), (bkv, bq))  # Sᵀ
                mask = None
                if masked:
                    keys_t = k_base + plgpu.broadcasted_iota(
                        jnp.int32, (bkv,), 0, layout=compat.ROW
                    )
                    mask = functools.partial(
                        mask_block_t,
                        keys=keys_t,
                        kstart=col(ranges_smem.at[slot, 0]),
                        kend=col(ranges_smem.at[slot, 1]),
                        segk=segk,
                        segq=col(ranges_smem.at[slot, 2]) if plan.has_segments else None,
                    )
                p, _ = probs_t(raw, col(stats_smem.at[slot, 0]), plan, mask)
                plgpu.barrier_wait(do_ready.at[slot])
                dv, dp = compat.mma_accumulate_and(  # dV += Pᵀ·dO with dPᵀ = V·dOᵀ
                    dv,
                    p.astype(dtype),
                    do_smem.at[slot],
                    (v_at, compat.transpose(do_smem.at[slot])),
                    (bkv, bq),
                    p_smem,
                )
                plgpu.barrier_arrive(do_free.at[slot])
                slope = None
                if plan.soft_cap is not None:  # from P: no [bkv, bq] slope held across the wgmma
                    slope = cap_slope(p, col(stats_smem.at[slot, 0]), plan.soft_cap)
                ds = dscores_t(p, dp, col(stats_smem.at[slot, 1]), slope).astype(dtype)
                if not atomic:
                    dk = compat.mma_accumulate(dk, ds, q_smem.at[slot], p_smem)
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dk, dv
                # dK += dSᵀ·Q and dQ = dS·K (Σ over both warpgroups' keys with `split`) in
                # one wgmma group; dSᵀ through shared memory (dS is its transposed view), two
                # steps' buffers: a warpgroup writes step n + 2's only after the other has
                # met it at step n + 1, after its step-n dQ product ended.
                par = lax.rem(n, 2)
                ds_smem2[wg].at[par][...] = ds
                plgpu.commit_smem()
                if split:
                    plgpu.barrier_arrive(ds_ready.at[par])
                    cols = pl.ds(wg * DQ_COLS, DQ_COLS)
                    pairs = [
                        (compat.transpose(ds_smem2[u].at[par]), k_at(u).at[:, cols])
                        for u in range(COMPUTE_WGS)
                    ]
                    meet = functools.partial(plgpu.barrier_wait, ds_ready.at[par])
                else:
                    cols = pl.ds(0, DQ_COLS)
                    pairs = [(compat.transpose(ds_smem2[wg].at[par]), k_at(wg))]
                    meet = None
                dk = compat.mma_accumulate(dk, ds, q_smem.at[slot], p_smem, meet)
                dq = compat.mma_sum(pairs, (bq, DQ_COLS))
                rows = pl.ds((lo + n - gi * nb) * bq, bq)
                dst = dq_ref.at[b, rows, kh * g + gi, cols]
                if not plan.interpret:
                    plgpu.barrier_arrive(q_free.at[slot])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # step n − 1's reduce-add
                    compat.reduce_add_to_gmem(dq, dq_smem2[wg], dst)
                    return dk, dv
                # The interpreter's read-add-write: at H=64 both warpgroups add to the same
                # rows, warpgroup 1 after 0 (`dq_turn`, per ring slot: 0 is < stages ahead).
                if not split and wg == 1:
                    plgpu.barrier_wait(dq_turn.at[slot])
                compat.reduce_add_to_gmem(dq, dq_smem2[wg], dst, dq_io.at[wg])
                if not split and wg == 0:
                    plgpu.barrier_arrive(dq_turn.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            n0 = gi * nb
            return three_phase(n0, n0 + n_flo, n0 + n_fhi, n0 + nb, step, carry)

        dk, dv = head(0, carry) if g == 1 else lax.fori_loop(0, g, head, carry)
        if split:  # the other warpgroup's last dQ product has read this K
            plgpu.barrier_arrive(kv_done)
            plgpu.barrier_wait(kv_done)
        k_smem[...] = (dk * plan.scale).astype(dtype)  # K's and V's buffers are free by now
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kh])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kh])
        plgpu.wait_smem_to_gmem(0)

    # One branch per compute warpgroup, wg a Python int: with wg traced, the addresses of its
    # K, V (and Pᵀ) buffers and its schedule entries were registers live through the loops,
    # and at H=128 ptxas spilled 8 B (GQA: 20 B, bench/NOTES.md v14). Twice the code, no
    # instruction more in a loop.
    for w in range(COMPUTE_WGS):
        pl.when(wg_index == w)(functools.partial(_compute, w))

    @pl.when(wg_index == COMPUTE_WGS)
    def _memory():
        if not plan.interpret:
            plgpu.set_max_registers(24, action="decrease")
        lo, hi = sched_ref[b, t, 0], sched_ref[b, t, 1]

        def copy(src, dst, ready):
            def issue(gi, i, slot):  # query head kh·g + gi, query block i
                rows = pl.ds(i * bq, bq)
                plgpu.copy_gmem_to_smem(src.at[b, rows, kh * g + gi], dst.at[slot], ready.at[slot])

            return issue

        def issue_q(gi, i, slot):  # Q with its rows' lse₂, D and key ranges
            copy(q_ref, q_smem, q_ready)(gi, i, slot)
            rows = pl.ds(i * bq, bq)
            stats = stats_ref.at[b, kh * g + gi, :, rows]
            plgpu.copy_gmem_to_smem(stats, stats_smem.at[slot], stats_ready.at[slot])
            ranges = ranges_ref.at[b, :, rows]
            plgpu.copy_gmem_to_smem(ranges, ranges_smem.at[slot], ranges_ready.at[slot])

        streams = [(issue_q, q_free), (copy(do_ref, do_smem, do_ready), do_free)]
        _stream(g, lo, hi, streams, stages)


def _stream(groups: int, lo, hi, streams, stages: int) -> None:
    """The memory warpgroup's loop: for each of `groups` heads the blocks [lo, hi), step n
    (n = gi·(hi − lo) + j − lo) through a ring of `stages` buffers.

    `streams` is [(issue(gi, j, slot), free barrier)]: `issue` starts the TMA copies of step
    n into `slot` (arriving on that slot's "ready" barriers); step n reuses the slot of step
    n − stages once both compute warpgroups have arrived at its "free" barrier. At the end
    every "free" phase is waited for, so none is left unobserved when the barriers go (the
    interpreter checks it). Nested loops, not a division of n: a 24-register warpgroup.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    nb = hi - lo

    def block(j, gi):
        n = gi * nb + j - lo
        slot = lax.rem(n, stages)
        for issue, free in streams:

            @pl.when(n >= stages)
            def _(free=free):
                plgpu.barrier_wait(free.at[slot])

            issue(gi, j, slot)
        return gi

    def head(gi, carry):
        lax.fori_loop(lo, hi, block, gi)
        return carry

    if groups == 1:
        lax.fori_loop(lo, hi, block, 0)
    else:
        lax.fori_loop(0, groups, head, 0)

    def drain(n):
        slot = lax.rem(n, stages)
        for _, free in streams:
            plgpu.barrier_wait(free.at[slot])

    for i in range(stages):
        n = groups * nb - stages + i
        pl.when(n >= 0)(functools.partial(drain, n))


def launch(plan: mosaic.Plan, q, k, v, do, inp: BwdInputs):
    """(dQ, dK, dV) by the two Mosaic GPU kernels (the interpreter's when `plan.interpret`),
    or with atomic dQ by the dK/dV kernel alone."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from chunkattn.pallas import mosaic_compat as compat

    batch, seq_q, heads, h = q.shape
    seq_k, kv_heads, hv = k.shape[1], k.shape[2], v.shape[-1]
    bp = plan.backward
    stages = bp.num_stages

    def tiled(shape):  # wgmma's operand layout: 8×64-element tiles, 128-byte swizzle
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        return plgpu.SMEM(shape, q.dtype, transforms=transforms)

    extra = {}
    if plan.interpret:
        extra["interpret"] = compat.interpret_params()
    params = plgpu.CompilerParams(approx_math=True)
    operands = [q, k, v, do, inp.lse2, inp.delta, inp.kstart, inp.kend]
    segs = [inp.segq, inp.segk] if plan.has_segments else []

    dq = None
    if bp.dq == "kernel":
        bq, bk = 64, bp.block_k_dq
        dq_smem = (
            tiled((COMPUTE_WGS, bq, h)),
            tiled((COMPUTE_WGS, bq, hv)),
            tiled((stages, bk, h)),
            tiled((stages, bk, hv)),
            tiled((COMPUTE_WGS, bq, bk)) if plan.interpret else None,
        )
        dq_barriers = (
            plgpu.Barrier(num_barriers=stages),  # K block ready
            plgpu.Barrier(num_barriers=stages),  # V block ready
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q ready
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # dO ready
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # K buffer free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # V buffer free
        )
        dq = plgpu.kernel(
            functools.partial(_dq_kernel, plan=plan),
            out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
            scratch_types=[dq_smem, dq_barriers],
            grid=(heads, seq_q // (COMPUTE_WGS * bq), batch),
            grid_names=("heads", "q_seq", "batch"),
            num_threads=COMPUTE_WGS + 1,
            thread_name="wg",
            compiler_params=params,
            kernel_name="chunkattn_mosaic_bwd_dq",
            **extra,
        )(*operands, inp.sched_dq, *segs)

    bq, bkv = bp.block_q, bp.block_kv
    atomic = bp.dq == "atomic"
    stats = jnp.stack([inp.lse2, inp.delta], axis=2)  # (B, N, 2, Tp)
    rows = [inp.kstart, inp.kend] + ([inp.segq] if plan.has_segments else [])
    ranges = jnp.stack(rows, axis=1)  # (B, 2 or 3, Tp) int32
    dkdv_operands = [q, k, v, do, stats, ranges, inp.sched_kv]
    if plan.has_segments:
        dkdv_operands.append(inp.segk)
    dq_f32 = plgpu.SMEM(  # a warpgroup's float32 dQ block: 8×32-element tiles, 128-byte swizzle
        (bq, DQ_COLS),
        jnp.float32,
        transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)),
    )
    per_wg = lambda shape: tuple(tiled(shape) for _ in range(COMPUTE_WGS))  # noqa: E731
    kv_smem = (  # a buffer per compute warpgroup, not one [2, ...]: jax 0.11 does not lower a
        # static index into it closed over by a loop ("Shaped arrays must be represented by
        # ir.Values, got: TypedInt(0)")
        per_wg((1, bkv, h) if atomic else (bkv, h)),  # atomic: [1, ...], read at a traced 0
        per_wg((1, bkv, hv) if atomic else (bkv, hv)),
        tiled((stages, bq, h)),
        tiled((stages, bq, hv)),
        plgpu.SMEM((stages, 2, bq), jnp.float32),  # lse₂, D
        plgpu.SMEM((stages, len(rows), bq), jnp.int32),  # kstart, kend (, segment ids)
        per_wg((bkv, bq)) if plan.interpret else None,  # Pᵀ, then dSᵀ
        per_wg((2, bkv, bq)) if atomic else None,  # dSᵀ, two steps' worth
        tuple(dq_f32 for _ in range(COMPUTE_WGS)) if atomic else None,
    )
    split = atomic and h == COMPUTE_WGS * DQ_COLS
    kv_barriers = (
        plgpu.Barrier(num_barriers=stages),  # Q block ready
        plgpu.Barrier(num_barriers=stages),  # dO block ready
        plgpu.Barrier(num_barriers=stages),  # lse₂, D ready
        plgpu.Barrier(num_barriers=stages),  # key ranges ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # V ready
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # Q buffer free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # dO buffer free
        # Atomic dQ, H=128: both dSᵀ of a step written; both dQ products done (K reusable).
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2) if split else None,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS) if split else None,
        # The interpreter's read-add-write of dQ: its TMA read; at H=64 warpgroup 0's turn.
        plgpu.Barrier(num_barriers=COMPUTE_WGS) if atomic and plan.interpret else None,
        plgpu.Barrier(num_barriers=stages) if atomic and plan.interpret and not split else None,
    )

    def kernel_args(batch):  # the dK/dV kernel's: its grid, name, shared memory, barriers
        grid = (kv_heads, seq_k // (COMPUTE_WGS * bkv), batch)
        return dict(
            out_type=(
                jax.ShapeDtypeStruct((batch, *k.shape[1:]), k.dtype),
                jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype),
            ),
            scratch_types=[kv_smem, kv_barriers],
            grid=grid,
            grid_names=("heads", "kv_seq", "batch"),
            num_threads=COMPUTE_WGS + 1,
            thread_name="wg",
            compiler_params=params,
        )

    body = functools.partial(_dkdv_kernel, plan=plan)
    name = "chunkattn_mosaic_bwd_dkdv"
    if not atomic:
        dk, dv = plgpu.kernel(body, kernel_name=name, **kernel_args(batch), **extra)(*dkdv_operands)
        return dq, dk, dv

    @jax.custom_batching.custom_vmap
    def dq_dk_dv(*operands):  # operands lead with the batch, folded under vmap (_fold_vmap)
        q_in, k_in, v_in = operands[:3]
        kernel = compat.kernel(
            body, name=name, interpret=extra.get("interpret"), **kernel_args(q_in.shape[0])
        )

        def run(refs):  # the float32 dQ, zeroed, a Ref the kernel adds to in place
            dq_ref, dk_ref, dv_ref = refs
            dk_ref[...], dv_ref[...] = kernel(*operands, dq_ref)

        # run_state keeps the Ref inside (the backward's custom_jvp guard has no rule for one).
        zeros = jnp.zeros(q_in.shape, jnp.float32)
        return pl.run_state(run)((zeros, jnp.zeros_like(k_in), jnp.zeros_like(v_in)))

    dq_dk_dv.def_vmap(functools.partial(_fold_vmap, dq_dk_dv))
    dq, dk, dv = dq_dk_dv(*dkdv_operands)
    return (dq * plan.scale).astype(q.dtype), dk, dv


def _fold_vmap(fn, axis_size: int, in_batched, *operands):
    """vmap rule of a kernel call whose every operand and result leads with the batch: the
    mapped axis folds into it ([V, B, ...] → [V·B, ...], an unmapped operand broadcast), one
    launch with V times the programs. jax's Ref discharge (`pl.run_state`) has no batching
    rule, and plgpu.kernel's (a grid axis) takes no Ref (`mosaic_compat.kernel`)."""

    def fold(x, batched):
        x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        return x.reshape(axis_size * x.shape[1], *x.shape[2:])

    batch = operands[0].shape[1 if in_batched[0] else 0]
    outs = fn(*map(fold, operands, in_batched))
    unfold = tuple(o.reshape(axis_size, batch, *o.shape[1:]) for o in outs)
    return unfold, (True,) * len(outs)
