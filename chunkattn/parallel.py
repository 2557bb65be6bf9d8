"""Context parallelism: ring attention over one mesh axis, built on `shard_map` and `ppermute`.

The sequence is sharded over `axis_name` in contiguous blocks; for causal attention each device
re-deals its block into *striped* order with one all_to_all, so that device d holds positions
d, d + n, d + 2n, … (Brandon et al. 2023, "Striped Attention"). Every device keeps its query
block; key/value blocks travel the ring with `ppermute` while each device runs the chunked core
on (its queries, the visiting block) and merges the partial results by log-sum-exp — the same
merge as `summary.merge`. Under a causal mask the striped order balances the work exactly and
keeps each block pair a plain causal problem: query i (global i·n + d) sees key m (global
m·n + j) iff m ≤ i when j ≤ d, and m ≤ i − 1 when j > d, i.e. `is_causal` with q_offset 0 or −1.

Backward (`jax.custom_vjp`): residuals are the local q, k, v, out and lse. The key/value blocks
travel the ring again, each with its dK/dV accumulator; every device adds the block's gradient
from its queries (`chunked._backward` with the global out and lse, FlashAttention-2 §3.1) and
passes both on, so after n steps each accumulator is home and complete.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chunkattn import chunked, masks
from chunkattn.arguments import normalize_segment_ids
from chunkattn.summary import ChunkSummary, merge, sink_summary

Array = jax.Array


class _Ring(NamedTuple):
    axis_name: str
    size: int
    is_causal: bool
    st: chunked.Static


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _block_arrays(ring: _Ring, src: Array, batch: int, seg_q, seg_k) -> masks.MaskArrays:
    """Mask arrays for (this device's queries, the block from device `src`)."""
    me = jax.lax.axis_index(ring.axis_name)
    off = jnp.where(src > me, -1, 0) if ring.is_causal else 0
    return masks.MaskArrays(
        q_offset=jnp.full((batch,), off, jnp.int32), q_segment_ids=seg_q, kv_segment_ids=seg_k
    )


def _source(ring: _Ring, step: Array) -> Array:
    """Which device's key/value block this device holds at ring step `step`."""
    return (jax.lax.axis_index(ring.axis_name) - step) % ring.size


def _pass_on(ring: _Ring, tree: Any) -> Any:
    perm = [(d, (d + 1) % ring.size) for d in range(ring.size)]
    return jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, ring.axis_name, perm), tree)


def _ring_forward(ring: _Ring, q, k, v, seg_q, seg_k, sinks):
    batch, seq_q, num_heads, _ = q.shape

    def step(i, carry):
        acc, (kb, vb, sb) = carry
        marr = _block_arrays(ring, _source(ring, i), batch, seg_q, sb)
        out, lse = chunked._forward(ring.st, q, kb, vb, None, (), marr, None)
        # (out, lse) as a summary: exp_values = out·e^(lse−m), exp_weights = e^(lse−m), m = lse
        finite = jnp.isfinite(lse)
        part = ChunkSummary(
            exp_values=jnp.where(finite[..., None], jnp.swapaxes(out, 1, 2).astype(jnp.float32), 0),
            exp_weights=finite.astype(jnp.float32),
            max_score=lse,
        )
        return merge(acc, part), _pass_on(ring, (kb, vb, sb))

    start = ChunkSummary.empty(batch, num_heads, seq_q, v.shape[-1])
    if sinks is not None:  # each row's sink, merged once, on the device that holds the row
        start = sink_summary(sinks, batch, seq_q, v.shape[-1])
    init = (start, (k, v, seg_k))
    acc, _ = jax.lax.fori_loop(0, ring.size, step, init)  # a loop bounds live memory
    return acc.output(q.dtype), acc.lse()


def _ring_backward(ring: _Ring, q, k, v, seg_q, seg_k, out, lse, dout):
    batch = q.shape[0]
    zero_dlse = jnp.zeros(lse.shape, jnp.float32)

    def step(i, carry):
        dq, (kb, vb, sb, dk_acc, dv_acc) = carry
        marr = _block_arrays(ring, _source(ring, i), batch, seg_q, sb)
        dqb, dkb, dvb, _, _ = chunked._backward(
            ring.st, q, kb, vb, None, (), marr, None, out, lse, dout, zero_dlse
        )
        travel = (kb, vb, sb, dk_acc + dkb.astype(jnp.float32), dv_acc + dvb.astype(jnp.float32))
        return dq + dqb.astype(jnp.float32), _pass_on(ring, travel)  # n passes: all home

    travel = (k, v, seg_k, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    init = (jnp.zeros(q.shape, jnp.float32), travel)
    dq, (_, _, _, dk, dv) = jax.lax.fori_loop(0, ring.size, step, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, seg_q, seg_k, sinks):
    return _ring_forward(ring, q, k, v, seg_q, seg_k, sinks)[0]


def _ring_fwd(ring, q, k, v, seg_q, seg_k, sinks):
    out, lse = _ring_forward(ring, q, k, v, seg_q, seg_k, sinks)
    return out, (q, k, v, seg_q, seg_k, sinks, out, lse)


def _ring_bwd(ring, res, dout):
    q, k, v, seg_q, seg_k, sinks, out, lse = res
    dq, dk, dv = _ring_backward(ring, q, k, v, seg_q, seg_k, out, lse, dout)
    # This device's rows' share of d sinks; shard_map's transpose sums the shares over the
    # mesh axes the (replicated) sinks are not split over.
    dsinks = None
    if sinks is not None:
        lse_res = jnp.where(jnp.isfinite(lse), lse, 0.0)
        dsinks = chunked.sink_gradient(sinks, out, lse_res, dout, jnp.zeros_like(lse))
    none = lambda x: None if x is None else jax.tree_util.tree_map(lambda _: None, x)
    return dq, dk, dv, none(seg_q), none(seg_k), dsinks


_ring.defvjp(_ring_fwd, _ring_bwd)


def _to_striped(x: Array, axis_name: str, n: int) -> Array:
    """Local contiguous block -> local striped block (one all_to_all over the ring axis).

    Device d holds positions d·L + i·n + j (i < L/n, j < n); piece j goes to device j, which
    concatenates the pieces by source d: positions ≡ j (mod n), in increasing order.
    """
    b, length = x.shape[:2]
    x = x.reshape(b, length // n, n, *x.shape[2:])  # (B, L/n, n, ...)
    x = jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
    return x.reshape(b, length, *x.shape[3:])  # (B, n·L/n, 1, ...) -> (B, L, ...)


def _from_striped(x: Array, axis_name: str, n: int) -> Array:
    """Inverse of `_to_striped`."""
    b, length = x.shape[:2]
    x = x.reshape(b, length, 1, *x.shape[2:])  # (B, L, 1, ...)
    x = jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)
    return x.reshape(b, length, *x.shape[3:])  # (B, L/n, n, ...) -> (B, L, ...)


def ring_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    sinks: Array | None = None,
    config: chunked.ChunkConfig | None = None,
    batch_axis: str | None = None,
) -> Array:
    """Exact attention with the sequence sharded over `mesh` axis `axis_name` (ring attention).

    Args:
      query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv] global arrays (sharded or
        not); T and S must be divisible by the axis size n. K divides N (GQA).
      mesh, axis_name: the mesh and the axis the sequence is split over.
      is_causal: causal masking (T == S); the striped order balances it over devices.
      scale: default 1/√H. segment_ids: [B, T] (T == S) or ([B, T], [B, S]).
      sinks: float [N], a logit per query head joining every row's denominator (as in
        `dot_product_attention`); replicated on every device, differentiable.
      config: a ChunkConfig for the per-device chunked computation.
      batch_axis: a mesh axis the batch is sharded over too (data parallelism), or None.

    Returns:
      [B, T, N, Hv], sharded along T over `axis_name`.

    Example:
        >>> mesh = jax.make_mesh((8,), ("sp",))
        >>> out = ring_attention(q, k, v, mesh=mesh, axis_name="sp", is_causal=True)
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"ring_attention takes [B, T, N, H] arrays, got query.shape={query.shape}, "
            f"key.shape={key.shape}, value.shape={value.shape}"
        )
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    n = mesh.shape[axis_name]
    batch, seq_q, num_heads, head_dim = query.shape
    seq_k, num_kv_heads = key.shape[1], key.shape[2]
    if batch_axis is not None and (
        batch_axis not in mesh.shape or batch_axis == axis_name or batch % mesh.shape[batch_axis]
    ):
        raise ValueError(
            f"batch_axis={batch_axis!r} must be another axis of the mesh {dict(mesh.shape)} "
            f"whose size divides the batch of query.shape={query.shape}"
        )
    if seq_q % n or seq_k % n:
        raise ValueError(
            f"sequence lengths must divide evenly over {n} devices of axis {axis_name!r}: "
            f"query.shape={query.shape}, key.shape={key.shape}"
        )
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3] or key.shape[3] != head_dim:
        raise ValueError(
            f"mismatched shapes: query.shape={query.shape}, key.shape={key.shape}, "
            f"value.shape={value.shape}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {num_kv_heads}")
    if is_causal and seq_q != seq_k:
        raise ValueError(f"causal ring attention needs T == S, got T={seq_q}, S={seq_k}")
    if is_causal and seq_q % (n * n):
        raise ValueError(
            f"causal ring attention stripes the sequence: T must be a multiple of n² = {n * n} "
            f"for {n} devices, got query.shape={query.shape}"
        )
    seg_q = seg_k = None
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        if sinks.shape != (num_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(
                f"sinks must be a float array of shape [N]=({num_heads},), got dtype "
                f"{sinks.dtype} and sinks.shape={sinks.shape}"
            )
    if segment_ids is not None:
        # Values kept exactly (uint32 reinterpreted, 64-bit refused unless x64): no wrapping.
        seg_q, seg_k = normalize_segment_ids(segment_ids, batch, seq_q, seq_k)
    tq_local, tk_local = seq_q // n, seq_k // n
    tq, tk = (config or chunked.ChunkConfig()).resolve(tq_local, tk_local, batch * num_heads)
    ring = _Ring(
        axis_name=axis_name,
        size=n,
        is_causal=is_causal,
        st=chunked.Static(
            spec=masks.MaskSpec(is_causal=is_causal),
            scale=float(head_dim**-0.5 if scale is None else scale),
            soft_cap=None,
            score_fn=None,
            dropout_rate=0.0,
            broadcast_dropout=True,
            tq=_largest_divisor(tq_local, tq),
            tk=_largest_divisor(tk_local, tk),
            seq_k=tk_local,
            precision=jax.lax.Precision.HIGHEST if query.dtype == jnp.float32 else None,
        ),
    )
    seq = P(batch_axis, axis_name)
    sharding = NamedSharding(mesh, seq)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    place = (
        (lambda x: jax.reshard(x, sharding))
        if explicit
        else (lambda x: jax.lax.with_sharding_constraint(x, sharding))
    )
    args = [place(x) for x in (query, key, value)]
    specs = [seq] * 3
    if seg_q is not None:
        args += [place(seg_q), place(seg_k)]
        specs += [seq] * 2
    if sinks is not None:
        args.append(sinks)
        specs.append(P())
    stripe = functools.partial(_to_striped, axis_name=axis_name, n=n)
    unstripe = functools.partial(_from_striped, axis_name=axis_name, n=n)

    has_segments, has_sinks = seg_q is not None, sinks is not None

    def local(q, k, v, *rest):
        rest = list(rest)
        seg_q, seg_k = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
        sinks = rest.pop(0) if has_sinks else None
        # Causal: striped order balances the triangle; otherwise contiguous blocks are fine.
        if is_causal:
            q, k, v = stripe(q), stripe(k), stripe(v)
            seg_q, seg_k = (None, None) if seg_q is None else (stripe(seg_q), stripe(seg_k))
        out = _ring(ring, q, k, v, seg_q, seg_k, sinks)
        return unstripe(out) if is_causal else out

    out = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=seq, check_vma=False)(
        *args
    )
    return place(out)
