"""Fused FlashAttention-2 kernels in Pallas (Triton lowering) for NVIDIA GPUs.

One file for the kernel family (as jax's own `pallas/ops/gpu/attention.py`): the validated
`PallasConfig`, the forward kernel (output and log-sum-exp), the two backward kernels (dK/dV
looping over query blocks, dQ looping over key blocks; FlashAttention-2, arXiv 2307.08691
§3.1), and the custom_vjp wiring. Scores live in the log2 domain inside the kernels
(s₂ = s·log₂e, so exp(s − m) = 2^(s₂ − m₂)), which turns every exponential into one `exp2`.

Masks are computed in the kernel from indices (causal, window, q_offset, lengths, segment ids,
tail padding); the loop over blocks runs in three phases — partial blocks before, full blocks
(no mask arithmetic), partial blocks after — with bounds from the mask, so blocks a causal or
windowed mask rules out are never loaded. GQA maps query head n to kv head n // G in the
BlockSpec index map: K and V are never repeated. Dense masks/biases, mask_fn, score_fn and
dropout are not implemented here: `attention` raises NotImplementedError naming them, and
`dot_product_attention(implementation=None)` falls back to the chunked path.

Set CHUNKATTN_PALLAS_INTERPRET=1 to run the kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Masked scores (log2 domain). Finite, so a row that has seen only masked keys stays NaN-free;
# the first real key's correction factor 2^(MASKED − m) = 0 wipes what it accumulated.
MASKED = -1.0e30


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

    def __post_init__(self):
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
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    groups: int  # query heads per kv head
    precision: Any
    interpret: bool


def _heuristic(head_dim: int, dtype: Any, seq_q: int, seq_k: int, cfg: PallasConfig) -> dict:
    """Block sizes per head dim and dtype (bench/NOTES.md), clipped to the sequence."""
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


# ----------------------------------------------------------------------------- in-kernel helpers


def _cdiv(a, b: int):
    """ceil(a / b) for a ≥ 0 (Triton-friendly: no floor division on signed scalars)."""
    return jax.lax.div(a + (b - 1), b)


def _fdiv(a, b: int):
    """floor(max(a, 0) / b): exact for a ≥ 0, 0 for a < 0 (callers clip at 0 anyway)."""
    return jax.lax.div(jnp.maximum(a, 0), b)


def _meta(meta_ref):
    """(q_offset, q_len, kv_len) of this batch entry, as int32 scalars."""
    m = meta_ref[...]
    idx = jnp.arange(4, dtype=jnp.int32)
    return tuple(jnp.sum(jnp.where(idx == i, m, 0)) for i in range(3))


def _scores(st: Static, s):
    """scale·q·kᵀ (→ soft cap), in the log2 domain."""
    if st.soft_cap is None:
        return s * (st.scale * LOG2E)
    return (st.soft_cap * LOG2E) * jnp.tanh(s * (st.scale / st.soft_cap))


def _mask(st: Static, qpos, cols, kv_len, segq, segk):
    """Predicate [bq, bk]: key may be attended (tail keys are beyond kv_len)."""
    allowed = cols[None, :] < kv_len
    if st.is_causal:
        allowed &= cols[None, :] <= qpos[:, None]
    if st.window is not None:
        left, right = st.window
        allowed &= (cols[None, :] >= qpos[:, None] - left) & (
            cols[None, :] <= qpos[:, None] + right
        )
    if st.has_segments:
        allowed &= segq[:, None] == segk[None, :]
    return allowed


def _kv_ranges(st: Static, q_start, bq: int, bk: int, nk: int, off, q_len, kv_len):
    """Key blocks [lo, hi) seen by rows [q_start, q_start+bq), and the full ones [flo, fhi)."""
    first, last = q_start + off, q_start + bq - 1 + off
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nk), _cdiv(kv_len, bk))
    fhi = jnp.minimum(hi, _fdiv(kv_len, bk))  # blocks wholly below kv_len
    flo = lo
    if st.is_causal:
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(last + 1, 0), bk))
        fhi = jnp.minimum(fhi, _fdiv(first + 1, bk))
    if st.window is not None:
        left, right = st.window
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(last + right + 1, 0), bk))
        lo = _fdiv(first - left, bk)
        flo = _cdiv(jnp.maximum(last - left, 0), bk)
        fhi = jnp.minimum(fhi, _fdiv(first + right + 1, bk))
    hi = jnp.where(q_start < q_len, jnp.maximum(hi, lo), lo)  # padding queries need no keys
    if st.has_segments:
        flo = fhi = lo
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def _q_ranges(st: Static, k_start, bq: int, bk: int, nq: int, off, q_len, kv_len):
    """Query blocks [lo, hi) that see keys [k_start, k_start+bk), and the full ones [flo, fhi)."""
    k_last = k_start + bk - 1
    lo = jnp.int32(0)
    hi = jnp.minimum(jnp.int32(nq), _cdiv(q_len, bq))
    flo = lo
    fhi = jnp.where(k_last < kv_len, hi, lo)
    if st.is_causal:  # row + off >= k_start for some row; >= k_last for all rows
        lo = _fdiv(k_start - off, bq)
        flo = _cdiv(jnp.maximum(k_last - off, 0), bq)
    if st.window is not None:
        left, right = st.window
        lo = jnp.maximum(lo, _fdiv(k_start - off - right, bq))
        hi = jnp.minimum(hi, _cdiv(jnp.maximum(k_last + left - off + 1, 0), bq))
        flo = jnp.maximum(flo, _cdiv(jnp.maximum(k_last - off - right, 0), bq))
        fhi = jnp.minimum(fhi, _fdiv(k_start + left - off + 1, bq))
    hi = jnp.where(k_start < kv_len, jnp.maximum(hi, lo), lo)  # padding keys are seen by none
    if st.has_segments:
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


def _fwd_kernel(q_ref, k_ref, v_ref, meta_ref, *rest, st: Static, nk: int):
    if st.has_segments:
        segq_ref, segk_ref, o_ref, lse_ref = rest
    else:
        (o_ref, lse_ref), segq_ref, segk_ref = rest, None, None
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    off, q_len, kv_len = _meta(meta_ref)
    q = q_ref[...]  # (bq, H)
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)
    qpos = rows + off
    segq = segq_ref[pl.ds(q_start, bq)] if st.has_segments else None

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]  # (bk, H)
        v = v_ref[pl.ds(k_start, bk), :]  # (bk, Hv)
        s = _scores(st, plgpu.dot(q, k, trans_b=True, precision=st.precision))  # (bq, bk)
        if masked:
            cols = k_start + jnp.arange(bk, dtype=jnp.int32)
            segk = segk_ref[pl.ds(k_start, bk)] if st.has_segments else None
            s = jnp.where(_mask(st, qpos, cols, kv_len, segq, segk), s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=st.precision)
        return acc, m_new, l

    lo, flo, fhi, hi = _kv_ranges(st, q_start, bq, bk, nk, off, q_len, kv_len)
    init = (
        jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
        jnp.full((bq,), MASKED, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _three_phase(lo, flo, fhi, hi, body, init)
    valid = (m > 0.5 * MASKED) & (rows < q_len)  # saw at least one key
    safe_l = jnp.where(valid, l, 1.0)
    o_ref[...] = jnp.where(valid[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, (m + jnp.log2(safe_l)) * LN2, -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *rest, st, nk):
    if st.has_segments:
        segq_ref, segk_ref, dq_ref = rest
    else:
        (dq_ref,), segq_ref, segk_ref = rest, None, None
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    off, q_len, kv_len = _meta(meta_ref)
    q, do = q_ref[...], do_ref[...]  # (bq, H), (bq, Hv)
    lse2, delta = lse_ref[...], delta_ref[...]  # (bq,) log2-domain lse (+inf: no key), D
    qpos = q_start + jnp.arange(bq, dtype=jnp.int32) + off
    segq = segq_ref[pl.ds(q_start, bq)] if st.has_segments else None

    def body(j, dq, masked):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)
        s = _scores(st, raw)
        if masked:
            cols = k_start + jnp.arange(bk, dtype=jnp.int32)
            segk = segk_ref[pl.ds(k_start, bk)] if st.has_segments else None
            s = jnp.where(_mask(st, qpos, cols, kv_len, segq, segk), s, MASKED)
        p = jnp.exp2(s - lse2[:, None])  # P = exp(s − lse); 0 where masked
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)  # dO·Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − D)
        if st.soft_cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh²
            t = jnp.tanh(raw * (st.scale / st.soft_cap))
            ds = ds * (1.0 - t * t)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=st.precision)

    lo, flo, fhi, hi = _kv_ranges(st, q_start, bq, bk, nk, off, q_len, kv_len)
    dq = _three_phase(lo, flo, fhi, hi, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *rest, st, nq):
    if st.has_segments:
        segq_ref, segk_ref, dk_ref, dv_ref = rest
    else:
        (dk_ref, dv_ref), segq_ref, segk_ref = rest, None, None
    bq, bk = st.block_q_bwd, st.block_k_bwd
    k_start = pl.program_id(0) * bk
    off, q_len, kv_len = _meta(meta_ref)
    k, v = k_ref[...], v_ref[...]  # (bk, H), (bk, Hv)
    cols = k_start + jnp.arange(bk, dtype=jnp.int32)
    segk = segk_ref[pl.ds(k_start, bk)] if st.has_segments else None

    def body(i, carry, masked):
        dk, dv = carry
        q_start = i * bq
        q = q_ref[pl.ds(q_start, bq), :]
        do = do_ref[pl.ds(q_start, bq), :]
        lse2 = lse_ref[pl.ds(q_start, bq)]
        delta = delta_ref[pl.ds(q_start, bq)]
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)  # (bq, bk)
        s = _scores(st, raw)
        if masked:
            qpos = q_start + jnp.arange(bq, dtype=jnp.int32) + off
            segq = segq_ref[pl.ds(q_start, bq)] if st.has_segments else None
            s = jnp.where(_mask(st, qpos, cols, kv_len, segq, segk), s, MASKED)
        p = jnp.exp2(s - lse2[:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision)
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)
        ds = p * (dp - delta[:, None])
        if st.soft_cap is not None:
            t = jnp.tanh(raw * (st.scale / st.soft_cap))
            ds = ds * (1.0 - t * t)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=st.precision)
        return dk, dv

    lo, flo, fhi, hi = _q_ranges(st, k_start, bq, bk, nq, off, q_len, kv_len)
    init = (
        jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dk, dv = _three_phase(lo, flo, fhi, hi, body, init)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas_calls


def _params(st: Static, backward: bool = False):
    if backward:
        return plgpu.CompilerParams(num_warps=st.num_warps_bwd, num_stages=st.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _seq_specs(st: Static, which: str):
    """BlockSpecs for the (optional) segment-id rows, whole per batch entry."""
    if not st.has_segments:
        return []
    return [
        pl.BlockSpec((None, which[0]), lambda *g: (g[1], 0)),
        pl.BlockSpec((None, which[1]), lambda *g: (g[1], 0)),
    ]


def _forward(st: Static, q, k, v, meta, seg):
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, head_dim_v = k.shape[1], v.shape[-1]
    bq, g = st.block_q, st.groups
    grid = (seq_q // bq, batch, num_heads)
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, n: (b, 0, n // g, 0)),
        pl.BlockSpec((None, seq_k, None, head_dim_v), lambda i, b, n: (b, 0, n // g, 0)),
        pl.BlockSpec((None, 4), lambda i, b, n: (b, 0)),
        *_seq_specs(st, (seq_q, seq_k)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, head_dim_v), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, seq_q, num_heads, head_dim_v), q.dtype),
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
    )(q, k, v, meta, *seg)


def _backward(st: Static, q, k, v, meta, seg, out, lse, dout, dlse):
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    g = st.groups
    # D = rowsum(dO ∘ O) − dlse (the lse output's cotangent enters dS as +P·dlse).
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)  # no key: P = 2^(s − ∞) = 0
    row_spec = lambda blk: pl.BlockSpec((None, None, blk), lambda i, b, n: (b, n, i))
    full_row = pl.BlockSpec((None, None, seq_q), lambda j, b, n: (b, n, 0))

    bq = st.block_q
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nk=seq_k // st.block_k),
        grid=(seq_q // bq, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, n: (b, 0, n // g, 0)),
            pl.BlockSpec((None, seq_k, None, head_dim_v), lambda i, b, n: (b, 0, n // g, 0)),
            pl.BlockSpec((None, bq, None, head_dim_v), lambda i, b, n: (b, i, n, 0)),
            row_spec(bq),
            row_spec(bq),
            pl.BlockSpec((None, 4), lambda i, b, n: (b, 0)),
            *_seq_specs(st, (seq_q, seq_k)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dq",
    )(q, k, v, dout, lse2, delta, meta, *seg)

    bk = st.block_k_bwd
    part_dtype = k.dtype if g == 1 else jnp.float32  # per-query-head partials, summed below
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, nq=seq_q // st.block_q_bwd),
        grid=(seq_k // bk, batch, num_heads),
        in_specs=[
            pl.BlockSpec((None, seq_q, None, head_dim), lambda j, b, n: (b, 0, n, 0)),
            pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n // g, 0)),
            pl.BlockSpec((None, bk, None, head_dim_v), lambda j, b, n: (b, j, n // g, 0)),
            pl.BlockSpec((None, seq_q, None, head_dim_v), lambda j, b, n: (b, 0, n, 0)),
            full_row,
            full_row,
            pl.BlockSpec((None, 4), lambda j, b, n: (b, 0)),
            *_seq_specs(st, (seq_q, seq_k)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n, 0)),
            pl.BlockSpec((None, bk, None, head_dim_v), lambda j, b, n: (b, j, n, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, seq_k, num_heads, head_dim), part_dtype),
            jax.ShapeDtypeStruct((batch, seq_k, num_heads, head_dim_v), part_dtype),
        ],
        compiler_params=_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dkdv",
    )(q, k, v, dout, lse2, delta, meta, *seg)
    if g > 1:  # (B, S, K, G, H) summed over the group's query heads
        dk = dk.reshape(batch, seq_k, num_kv_heads, g, head_dim).sum(3).astype(k.dtype)
        dv = dv.reshape(batch, seq_k, num_kv_heads, g, head_dim_v).sum(3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(st: Static, q, k, v, meta, seg):
    """Fused attention on padded inputs: (out [B, Tp, N, Hvp], lse f32 [B, N, Tp])."""
    return _forward(st, q, k, v, meta, seg)


def _flash_fwd(st, q, k, v, meta, seg):
    out, lse = _forward(st, q, k, v, meta, seg)
    return (out, lse), (q, k, v, meta, seg, out, lse)


def _flash_bwd(st, res, cotangents):
    q, k, v, meta, seg, out, lse = res
    dout, dlse = cotangents
    dq, dk, dv = _backward(st, q, k, v, meta, seg, out, lse, dout, dlse)
    return dq, dk, dv, None, jax.tree_util.tree_map(lambda _: None, seg)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------- entry


def _pad_to(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def attention(args: Any, opts: Any) -> tuple[Array, Array]:
    """Serve a normalised request (`api.Arguments`, `api._Options`) with the fused kernels.

    Raises NotImplementedError naming the feature for what the kernels do not implement.
    """
    interpret = interpret_mode()
    if jax.default_backend() != "gpu" and not interpret:
        raise NotImplementedError("the pallas implementation needs a GPU backend")
    unsupported = [
        ("a dense bias", args.bias is not None),
        ("a dense mask", args.mask is not None),
        ("mask_fn", opts.mask_fn is not None),
        ("score_fn", opts.score_fn is not None),
        ("dropout", opts.dropout_rate > 0),
        ("float64", args.query.dtype == jnp.float64),
        ("head dims above 256", max(args.query.shape[-1], args.value.shape[-1]) > 256),
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
    hp, hvp = max(16, pl.next_power_of_2(head_dim)), max(16, pl.next_power_of_2(head_dim_v))
    blocks = _heuristic(max(hp, hvp), q.dtype, seq_q, seq_k, cfg)
    tq = max(blocks["block_q"], blocks["block_q_bwd"])
    tk = max(blocks["block_k"], blocks["block_k_bwd"])
    pq, pk = -(-seq_q // tq) * tq, -(-seq_k // tk) * tk
    precision = opts.precision
    st = Static(
        scale=args.scale,
        is_causal=opts.is_causal,
        window=args.local_window_size,
        soft_cap=args.logits_soft_cap,
        has_segments=args.segment_ids is not None,
        groups=num_heads // num_kv_heads,
        precision=precision,
        interpret=interpret,
        **blocks,
    )
    q_len = args.query_seq_lengths if args.query_seq_lengths is not None else seq_q
    kv_len = args.key_value_seq_lengths if args.key_value_seq_lengths is not None else seq_k
    meta = jnp.stack(
        [
            args.q_offset,
            jnp.minimum(jnp.broadcast_to(q_len, (batch,)), seq_q),
            jnp.minimum(jnp.broadcast_to(kv_len, (batch,)), seq_k),
            jnp.zeros((batch,), jnp.int32),
        ],
        axis=1,
    ).astype(jnp.int32)  # (B, 4)
    seg = ()
    if args.segment_ids is not None:
        seg = (_pad_to(args.segment_ids[0], 1, pq), _pad_to(args.segment_ids[1], 1, pk))
    qp = _pad_to(_pad_to(q, 1, pq), 3, hp)
    kp = _pad_to(_pad_to(k, 1, pk), 3, hp)
    vp = _pad_to(_pad_to(v, 1, pk), 3, hvp)
    out, lse = flash_attention(st, qp, kp, vp, meta, seg)
    return out[:, :seq_q, :, :head_dim_v], lse[:, :, :seq_q]
