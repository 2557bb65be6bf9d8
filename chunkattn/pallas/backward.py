"""The backward kernels and their pallas_calls (FlashAttention-2, arXiv 2307.08691 §3.1): dK/dV
with one program per key block looping over query blocks (with `PallasConfig.backward="atomic"`
it also adds dS·K into a float32 dQ with atomics), and dQ with one program per query block
looping over key blocks. Both recompute P = exp(s − lse) from the forward's residuals;
dS = P ∘ (dP − D) with D = rowsum(dO ∘ O). The backward kernels differentiate `score_fn` by a
forward-mode derivative of the traced function (`kernel_common.dscore`), exact for an
elementwise function. The gradient of a dense bias is computed by the chunked path's backward
from the same residuals (`bias_gradient`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chunkattn import chunked
from chunkattn.pallas.config import block_width, f32_dot_precision
from chunkattn.pallas.kernel_common import (
    F32_MAX,
    LOG2E,
    META,
    Pos,
    Static,
    allowed,
    block_scores,
    dense_block,
    dscore,
    extra_inputs,
    extra_specs,
    grid_position,
    grid_segment_ranges,
    keep_mask,
    keep_scale,
    kv_ranges,
    launch_params,
    load,
    q_ranges,
    read_meta,
    read_seed,
    score_exp,
    segment_bounds,
    split_refs,
    store,
    three_phase,
)
from chunkattn.summary import output_delta


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *refs, st, nk):
    ops, (dq_ref,) = split_refs(st, refs)
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    batch, head = grid_position(st)
    off, q_len, kv_len, bounds = read_meta(st, meta_ref)
    seed = read_seed(st, meta_ref)
    hd, hdv = st.head_dims
    q, do = load(q_ref, hd), load(do_ref, hdv)  # (bq, H), (bq, Hv)
    lse2, delta = lse_ref[...], delta_ref[...]  # (bq,) log2-domain lse (+inf: no key), D
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)
    qpos = rows + off
    segq = ops.segq[...] if st.has_segments else None  # this program's query block

    def body(j, dq, masked):
        k_start = j * bk
        ks = pl.ds(k_start, bk)
        k, v = load(k_ref, hd, ks), load(v_ref, hdv, ks)
        pos = Pos(batch, head, qpos, k_start + jnp.arange(bk, dtype=jnp.int32))
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)
        biased, s = block_scores(st, raw, pos, dense_block(ops.bias, st.bias_dims, None, ks))
        if masked:
            segk = ops.segk[ks] if st.has_segments else None
            mask = dense_block(ops.mask, st.mask_dims, None, ks)
            s = jnp.where(allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        p = score_exp(st, s - lse2[:, None])  # P = exp(s − lse); 0 where masked
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)  # dO·Vᵀ
        if st.dropout_rate:
            dp = jnp.where(keep_mask(st, seed, pos, rows), dp * keep_scale(st), 0.0)
        ds = dscore(st, p * (dp - delta[:, None]), raw, biased, pos)  # dS = P ∘ (dP − D)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=st.precision)

    seg = segment_bounds(st, ops)
    lo, flo, fhi, hi = kv_ranges(st, q_start, bq, bk, nk, bounds, q_len, kv_len, seg)
    dq = three_phase(lo, flo, fhi, hi, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    store(dq_ref, (dq * st.scale).astype(dq_ref.dtype), hd)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, *refs, st, nq):
    ops, outs = split_refs(st, refs)
    dq_ref = None
    if st.atomic_dq:  # dQ (float32, zeroed) is aliased in and out; the output ref is used
        _, dk_ref, dv_ref, dq_ref = outs
    else:
        dk_ref, dv_ref = outs
    bq, bk = st.block_q_bwd, st.block_k_bwd
    k_start = pl.program_id(0) * bk
    batch, head = grid_position(st)
    off, q_len, kv_len, bounds = read_meta(st, meta_ref)
    seed = read_seed(st, meta_ref)
    hd, hdv = st.head_dims
    k, v = load(k_ref, hd), load(v_ref, hdv)  # (bk, H), (bk, Hv)
    cols = k_start + jnp.arange(bk, dtype=jnp.int32)
    segk = ops.segk[...] if st.has_segments else None  # this program's key block
    # Exact float32 (FMA loops): K and V are read again in every step. Held across the loop,
    # Triton keeps them as FMA operands, whole head dims per thread: 16×16 at H=128 held 255
    # registers and spilled 828 B; read per step, 108 and none (bench/NOTES.md v12).
    reload = k_ref.dtype == jnp.float32 and f32_dot_precision(st.precision) == "ieee"
    kv_held = (k, v)

    def body(i, carry, masked):
        dk, dv = carry
        k, v = (load(k_ref, hd), load(v_ref, hdv)) if reload else kv_held
        q_start = i * bq
        qs = pl.ds(q_start, bq)
        q, do = load(q_ref, hd, qs), load(do_ref, hdv, qs)
        lse2, delta = lse_ref[qs], delta_ref[qs]
        rows = q_start + jnp.arange(bq, dtype=jnp.int32)
        pos = Pos(batch, head, rows + off, cols)
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)  # (bq, bk)
        biased, s = block_scores(st, raw, pos, dense_block(ops.bias, st.bias_dims, qs, None))
        if masked:
            segq = ops.segq[qs] if st.has_segments else None
            mask = dense_block(ops.mask, st.mask_dims, qs, None)
            s = jnp.where(allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        p = score_exp(st, s - lse2[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=st.precision)
        p_drop = p
        if st.dropout_rate:
            keep = keep_mask(st, seed, pos, rows)
            p_drop = jnp.where(keep, p * keep_scale(st), 0.0)
            dp = jnp.where(keep, dp * keep_scale(st), 0.0)
        dv = dv + plgpu.dot(p_drop.astype(do.dtype), do, trans_a=True, precision=st.precision)
        ds = dscore(st, p * (dp - delta[:, None]), raw, biased, pos)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=st.precision)
        if dq_ref is not None:  # whole rows: the accumulator is as wide as the block (below)
            dq = plgpu.dot(ds.astype(k.dtype), k, precision=st.precision) * st.scale
            plgpu.atomic_add(dq_ref, (qs, slice(None)), dq)
        return dk, dv

    seg = segment_bounds(st, ops)
    lo, flo, fhi, hi = q_ranges(st, k_start, bq, bk, nq, bounds, q_len, kv_len, seg)
    init = (
        jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dk, dv = three_phase(lo, flo, fhi, hi, body, init)
    store(dk_ref, (dk * st.scale).astype(dk_ref.dtype), hd)
    store(dv_ref, dv.astype(dv_ref.dtype), hdv)


def backward(st: Static, q, k, v, bias, meta, marr, out, lse, dout, dlse):
    batch, seq_q, num_heads, _ = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    head_dim, head_dim_v = map(block_width, st.head_dims)  # block widths
    g = st.groups
    # D = rowsum(dO ∘ O) − dlse (the lse output's cotangent enters dS as +P·dlse), exact in
    # float32 (an einsum here ran as a TF32 matmul on GPU).
    delta = output_delta(out, dout, dlse)
    no_key = ~jnp.isfinite(lse) | (lse >= F32_MAX)  # −inf, or the residual's F32_MAX
    lse2 = jnp.where(no_key, jnp.inf, lse * LOG2E if st.log2_domain else lse)  # no key: P = 0
    full_row = pl.BlockSpec((None, None, seq_q), lambda j, b, n: (b, n, 0))
    dq = None
    if not st.atomic_dq:
        # The dQ kernel has its own key block (config.heuristic: half the forward's at H=128,
        # where dQ spilled at 128×128); the kernel reads st.block_k, so it, its segment ranges
        # and its dense tiles get a Static with that block.
        sdq = st._replace(block_k=st.block_k_dq)
        extra = extra_inputs(sdq, bias, marr, seq_k, grid_segment_ranges(sdq, marr, meta, "q"))
        dq = _dq_call(sdq, q, k, v, dout, lse2, delta, meta, extra)

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
        *extra_specs(st, rows=seq_q, cols=bk, blocked="k"),
    ]
    out_specs = [
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n, 0)),
        pl.BlockSpec((None, bk, None, head_dim_v), lambda j, b, n: (b, j, n, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((batch, seq_k, num_heads, st.head_dims[0]), part_dtype),
        jax.ShapeDtypeStruct((batch, seq_k, num_heads, st.head_dims[1]), part_dtype),
    ]
    extra = extra_inputs(st, bias, marr, seq_k, grid_segment_ranges(st, marr, meta, "k"))
    operands = [q, k, v, dout, lse2, delta, meta, *extra]
    aliases = {}
    if st.atomic_dq:
        # The float32 dQ accumulator is as wide as the block, not the head dim: the kernel adds
        # whole rows with no mask (past the head dim they add 0: K's columns there load as 0).
        # A masked atomic would do on the GPU, but the interpreter cannot run one.
        acc_shape = (*q.shape[:3], head_dim)
        aliases = {len(operands): 2}
        operands.append(jnp.zeros(acc_shape, jnp.float32))
        in_specs.append(whole_q)
        out_specs.append(whole_q)
        out_shape.append(jax.ShapeDtypeStruct(acc_shape, jnp.float32))
    grads = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, nq=seq_q // st.block_q_bwd),
        grid=(seq_k // bk, batch, num_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=launch_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dkdv",
    )(*operands)
    dk, dv = grads[:2]
    if st.atomic_dq:
        dq = grads[2] if head_dim == q.shape[-1] else grads[2][..., : q.shape[-1]]
        dq = dq.astype(q.dtype)
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
            *extra_specs(st, rows=bq, cols=seq_k, blocked="q"),
        ],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=launch_params(st, backward=True),
        interpret=st.interpret,
        name="chunkattn_bwd_dq",
    )(q, k, v, dout, lse2, delta, meta, *extra)


def bias_gradient(st: Static, q, k, v, bias, meta, marr, seed, out, lse, dout, dlse):
    """dS reduced to the bias's own (broadcast) shape, by the chunked backward.

    The kernels would have to sum dS over the bias's broadcast dims across programs; the
    chunked backward does exactly that from the same residuals. Query rows the kernels treat as
    padding (lse −inf) are masked there too. When the bias is not differentiated XLA removes
    this computation as dead code.
    """
    marr = marr._replace(q_lengths=meta[:, 1], kv_lengths=meta[:, 2])
    grads = chunked.block_backward(
        st.bias_grad, q, k, v, bias, (), marr, seed, out, lse, dout, dlse
    )
    return grads[3]
