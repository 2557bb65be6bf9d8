"""The forward kernel and its pallas_call: output and log-sum-exp by the online softmax
(FlashAttention-2, arXiv 2307.08691 Algorithm 1), one program per (query block, batch, head)
looping over the key blocks its mask allows. GQA maps query head n to kv head n // G in the
BlockSpec index map: K and V are never repeated. Sinks start each row's running max and sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from chunkattn.pallas.config import block_width
from chunkattn.pallas.kernel_common import (
    LN2,
    LOG2E,
    META,
    Pos,
    Static,
    allowed,
    block_scores,
    dense_block,
    extra_inputs,
    extra_specs,
    grid_position,
    grid_segment_ranges,
    keep_mask,
    keep_scale,
    kv_ranges,
    launch_params,
    load,
    read_meta,
    read_seed,
    score_exp,
    segment_bounds,
    split_refs,
    store,
    three_phase,
)


def _fwd_kernel(q_ref, k_ref, v_ref, meta_ref, *refs, st: Static, nk: int):
    ops, (o_ref, lse_ref) = split_refs(st, refs, forward=True)
    bq, bk = st.block_q, st.block_k
    q_start = pl.program_id(0) * bq
    batch, head = grid_position(st)
    off, q_len, kv_len, bounds = read_meta(st, meta_ref)
    seed = read_seed(st, meta_ref)
    hd, hdv = st.head_dims
    q = load(q_ref, hd)  # (bq, H)
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)
    qpos = rows + off
    segq = ops.segq[...] if st.has_segments else None  # this program's query block

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * bk
        ks = pl.ds(k_start, bk)
        k, v = load(k_ref, hd, ks), load(v_ref, hdv, ks)  # (bk, H), (bk, Hv)
        pos = Pos(batch, head, qpos, k_start + jnp.arange(bk, dtype=jnp.int32))
        raw = plgpu.dot(q, k, trans_b=True, precision=st.precision)  # (bq, bk)
        _, s = block_scores(st, raw, pos, dense_block(ops.bias, st.bias_dims, None, ks))
        if masked:
            segk = ops.segk[ks] if st.has_segments else None
            mask = dense_block(ops.mask, st.mask_dims, None, ks)
            s = jnp.where(allowed(st, pos, rows, bounds, kv_len, segq, segk, mask), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: 2^(−inf − 0) = 0
        alpha = score_exp(st, m - shift)
        p = score_exp(st, s - shift[:, None])
        l = l * alpha + jnp.sum(p, axis=1)  # the normaliser counts dropped weights too
        if st.dropout_rate:
            p = jnp.where(keep_mask(st, seed, pos, rows), p * keep_scale(st), 0.0)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=st.precision)
        return acc, m_new, l

    seg = segment_bounds(st, ops)
    lo, flo, fhi, hi = kv_ranges(st, q_start, bq, bk, nk, bounds, q_len, kv_len, seg)
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
    if st.has_sinks:  # the sink is one more score with no value: max = sink, sum = 1
        sink = jnp.max(ops.sinks[...]) * (LOG2E if st.log2_domain else 1.0)
        m0 = jnp.full((bq,), sink, jnp.float32)
        l0 = jnp.where(m0 > -jnp.inf, 1.0, 0.0)
    init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), m0, l0)
    acc, m, l = three_phase(lo, flo, fhi, hi, body, init)
    valid = (l > 0) & (rows < q_len)  # saw a key or a sink (a finite bias keeps l ≥ 1)
    safe_l = jnp.where(valid, l, 1.0)
    store(o_ref, jnp.where(valid[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype), hdv)
    lse = m * LN2 + jnp.log(safe_l) if st.log2_domain else m + jnp.log(safe_l)
    lse_ref[...] = jnp.where(valid, lse, -jnp.inf)


def forward(st: Static, q, k, v, bias, meta, marr, sinks):
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
        *extra_specs(st, rows=bq, cols=seq_k, blocked="q"),
    ]
    extra = extra_inputs(st, bias, marr, seq_k, grid_segment_ranges(st, marr, meta, "q"))
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
        compiler_params=launch_params(st),
        interpret=st.interpret,
        name="chunkattn_fwd",
    )(q, k, v, meta, *extra)
