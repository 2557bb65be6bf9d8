"""The Pallas block contract: one query block against one key block at global positions, in
the fused Triton kernels. It is the counterpart of `chunked.block_forward` /
`chunked.block_backward`, and what ring attention (parallel.py) runs per ring step on a GPU.

`block_forward` returns (out, lse) of the block; `block_backward` runs the backward kernels
with the whole problem's (merged) out and lse for the block's rows, so P = exp(s − lse) is each
key's final weight and the gradients of all key blocks add up to the single-device gradient.

The kernels index rows and keys from 0 within their arrays. The block's global place, query
row `q_base` and key `k_base` (`masks.MaskArrays`), is folded into the per-batch `META`
columns (`block_meta`), not into the kernels:

- causal / window: local key c and row r are allowed iff lo ≤ c − r ≤ hi, the bounds of
  `masks.block_relative_bounds` (global key − row = c − r + k_base − q_base); the block's
  q_offset column is q_offset + q_base − k_base, saturated like the bounds;
- lengths: a row is padding iff q_base + r ≥ its query length, so the block's query length is
  that length − q_base, clipped to [0, rows]; likewise the key length with k_base;
- segment ids: the block's own slices, as the chunked contract takes them.

Positions that enter the kernels absolutely rather than as a difference cannot be shifted
this way: the dropout hash (global row and key), mask_fn and score_fn (global positions), and
a dense bias or mask. `block_static` refuses the first three with NotImplementedError naming
them, and the contract takes no dense operand; the chunked contract serves them all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from chunkattn import chunked, masks
from chunkattn.pallas.backward import backward
from chunkattn.pallas.config import PallasConfig, block_width, heuristic, interpret_mode
from chunkattn.pallas.forward import forward
from chunkattn.pallas.kernel_common import META, Array, Static, pad_to


def block_static(
    request: chunked.Static,
    q: Any,
    k: Any,
    v: Any,
    *,
    segment_dtype: Any = None,
    config: PallasConfig | None = None,
) -> Static:
    """The kernels' `Static` for blocks of shapes q [B, Tq, N, H], k [B, Tk, K, H], v
    [B, Tk, K, Hv] (arrays or ShapeDtypeStructs) of the request `request` describes.

    `segment_dtype`: the segment ids' dtype, None without them. Raises NotImplementedError
    naming what the blocks do not implement (see the module docstring), and off a GPU backend
    unless the interpreter is on (CHUNKATTN_PALLAS_INTERPRET=1).
    """
    interpret = interpret_mode()
    if jax.default_backend() != "gpu" and not interpret:
        raise NotImplementedError("the pallas block kernels need a GPU backend")
    cfg = PallasConfig() if config is None else config
    if not isinstance(cfg, PallasConfig):
        raise NotImplementedError(
            f"the pallas block kernels take a PallasConfig, got {type(cfg).__name__}"
        )
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    unsupported = [
        ("mask_fn", request.spec.mask_fn is not None),
        ("score_fn", request.score_fn is not None),
        ("dropout", request.dropout_rate > 0),
        ("float64", q.dtype == jnp.float64),
        ("head dims above 256", max(head_dim, head_dim_v) > 256),
        ("64-bit segment ids", segment_dtype is not None and jnp.dtype(segment_dtype).itemsize > 4),
    ]
    missing = [name for name, present in unsupported if present]
    if missing:
        raise NotImplementedError(
            f"the pallas block kernels do not implement {', '.join(missing)} at global "
            "positions (the chunked block contract does)"
        )
    width = max(block_width(head_dim), block_width(head_dim_v))
    return Static(
        scale=request.scale,
        is_causal=request.spec.is_causal,
        window=request.spec.window,
        soft_cap=request.soft_cap,
        has_segments=segment_dtype is not None,
        mask_fn=None,
        score_fn=None,
        bias_dims=None,
        mask_dims=None,
        has_sinks=False,  # the caller starts each row from its sink summary and merges blocks
        dropout_rate=0.0,
        broadcast_dropout=True,
        bias_grad=None,
        groups=q.shape[2] // k.shape[2],
        head_dims=(head_dim, head_dim_v),
        atomic_dq=cfg.backward == "atomic",
        precision=request.precision,
        interpret=interpret,
        **heuristic(width, q.dtype, q.shape[1], k.shape[1], cfg, precision=request.precision),
    )


def block_meta(st: Static, marr: masks.MaskArrays, rows: int, keys: int) -> Array:
    """int32 [B, 8], the `META` columns of a block of `rows` queries and `keys` keys whose
    first row and key are global row `marr.q_base` and key `marr.k_base` (module docstring)."""
    spec = masks.MaskSpec(st.is_causal, st.window)
    q_base, k_base = masks.bases(marr)
    off = marr.q_offset.astype(jnp.int32)
    batch = off.shape[0]
    lo, hi = masks.block_relative_bounds(spec, marr)
    # Only differences reach the kernels: an offset past ±REL_LIMIT changes no comparison.
    off = jnp.clip(off, -masks.REL_LIMIT, masks.REL_LIMIT) - (k_base - q_base)

    def length(lengths: Array | None, base: Array, size: int) -> Array:
        if lengths is None:
            return jnp.full((batch,), size, jnp.int32)
        return jnp.clip(jnp.maximum(lengths, 0) - base, 0, size)  # ≥ 0 first: cannot wrap

    zero = jnp.zeros((batch,), jnp.int32)
    columns = {
        "q_offset": off,
        "q_len": length(marr.q_lengths, q_base, rows),
        "kv_len": length(marr.kv_lengths, k_base, keys),
        "seed0": zero,
        "seed1": zero,
        "rel_lo": lo,
        "rel_hi": hi,
        "unused": zero,
    }
    return jnp.stack([columns[name].astype(jnp.int32) for name in META], axis=1)


def _padded(st: Static, rows: int, keys: int) -> tuple[int, int]:
    """Rows and keys padded to whole blocks of every kernel (powers of two: the larger block
    is a multiple of the other)."""
    bq, bk = max(st.block_q, st.block_q_bwd), max(st.block_k, st.block_k_bwd)
    return -(-rows // bq) * bq, -(-keys // bk) * bk


def _kernel_mask_arrays(marr: masks.MaskArrays, pq: int, pk: int) -> masks.MaskArrays:
    """The block's segment ids padded to whole blocks (by each row's last id, so the kernels'
    `segment_ranges` stay tight; padding is masked by the lengths)."""
    return marr._replace(
        q_segment_ids=masks.pad_segment_ids(marr.q_segment_ids, pq),
        kv_segment_ids=masks.pad_segment_ids(marr.kv_segment_ids, pk),
    )


def block_forward(st: Static, q: Array, k: Array, v: Array, marr: masks.MaskArrays):
    """(out [B, Tq, N, Hv] in the input dtype, lse f32 [B, N, Tq]) of the block at global
    positions (`marr.q_base`, `marr.k_base`); a row that sees no key of the block gives
    out 0 and lse −inf. Merge blocks with `summary.merge` on (out, lse)."""
    rows, keys = q.shape[1], k.shape[1]
    pq, pk = _padded(st, rows, keys)
    meta = block_meta(st, marr, rows, keys)
    qp, kp, vp = pad_to(q, 1, pq), pad_to(k, 1, pk), pad_to(v, 1, pk)
    out, lse = forward(st, qp, kp, vp, None, meta, _kernel_mask_arrays(marr, pq, pk), None)
    return out[:, :rows], lse[:, :, :rows]


def block_backward(
    st: Static,
    q: Array,
    k: Array,
    v: Array,
    marr: masks.MaskArrays,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array | None = None,
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) of the block from the whole problem's `out` [B, Tq, N, Hv] and `lse`
    [B, N, Tq] for its rows (merged over every key block, sinks included) and their
    cotangents (`dlse` None: 0). FA-2 backward (backward.py)."""
    rows, keys = q.shape[1], k.shape[1]
    pq, pk = _padded(st, rows, keys)
    meta = block_meta(st, marr, rows, keys)
    # The kernels mask padding queries by lse alone (the forward gives them −inf), but a merged
    # lse holds a padding row's sink: −inf (P = 0) for every row at or past the block's length.
    padding = jnp.arange(rows)[None, None, :] >= meta[:, 1][:, None, None]
    lse = jnp.where(padding, -jnp.inf, lse.astype(jnp.float32))
    dlse = jnp.zeros(lse.shape, jnp.float32) if dlse is None else dlse
    dq, dk, dv = backward(
        st,
        pad_to(q, 1, pq),
        pad_to(k, 1, pk),
        pad_to(v, 1, pk),
        None,
        meta,
        _kernel_mask_arrays(marr, pq, pk),
        pad_to(out, 1, pq),
        pad_to(lse, 2, pq, -jnp.inf),
        pad_to(dout, 1, pq),
        pad_to(dlse, 2, pq),
    )
    return dq[:, :rows], dk[:, :keys], dv[:, :keys]
