"""Context parallelism: ring attention over one mesh axis, built on `shard_map` and `ppermute`.

The sequence is sharded over `axis_name`. Each device keeps its query rows; key/value blocks
travel the ring with `ppermute`, and each device runs a public block contract (one query block
against one key block at global positions) on its rows and the visiting block, merging the
partial results by log-sum-exp (`summary.merge`). Because every position-based option is
evaluated at global positions (the block's `q_base` / `k_base`, masks.py), the result is the
single-device result: causal, window, q_offset, lengths, segment ids, mask_fn, score_fn, soft
cap, sinks, dropout (the same position hash) and GQA.

Two contracts serve a ring step (`_step_kernel` picks one per call): the chunked core's
(`chunked.block_forward` / `block_backward`, every option, every backend) and the fused Triton
kernels' (`pallas.block`: global positions folded into the kernels' per-batch columns; no
mask_fn, score_fn or dropout). `implementation=None` takes the kernels on a GPU backend when
they serve the request, the chunked core otherwise.

Layouts. Without a causal mask each device holds one contiguous block of the sequence. A
causal mask would leave the first device idle and the last one doing n times its share, so
causal requests use the zig-zag layout: the sequence is cut into 2n pieces and device d holds
pieces d and 2n − 1 − d (one early, one late), which gives every device the same number of
unmasked blocks (`ring_work` counts them). Two `ppermute`s re-deal the contiguous shards into
zig-zag order and two deal them back.

Steps. At step i a device holds the key/value block of device d − i. A step in which no
query piece of any device can see the visiting key piece (a local window, an offset) is
skipped: the blocks jump over it with one larger `ppermute` (`ring_steps`). Within a step the
chunk ranges of the core skip the empty chunk pairs of each piece pair.

Backward (`jax.custom_vjp`): residuals are the local q, k, v, out and lse. The key/value blocks
travel the ring again with their dK/dV accumulators; every device adds the block's gradient
from its rows (the contract's backward with the merged out and lse, FlashAttention-2 §3.1)
and passes both on, and the last pass brings each accumulator home.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chunkattn import chunked, masks
from chunkattn.arguments import (
    check_implementation,
    check_user_functions,
    explicit_closure,
    index_shapes,
    is_concrete,
    normalize_arguments,
    resolve_precision,
)
from chunkattn.summary import ChunkSummary, accum_dtype, merge, row_start

if TYPE_CHECKING:  # the kernels are imported lazily, by ring_attention when it runs them
    from chunkattn.pallas import PallasConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Which global pieces each device holds: device d holds `pieces(d)`, each `piece_q` query
    rows and `piece_k` keys long (piece p starts at row p·piece_q and key p·piece_k)."""

    size: int  # devices on the ring axis
    zigzag: bool  # two pieces per device (d, 2n − 1 − d) instead of one (d)
    piece_q: int
    piece_k: int

    def pieces(self, device: int) -> tuple[int, ...]:
        n = self.size
        return (device, 2 * n - 1 - device) if self.zigzag else (device,)


def ring_layout(size: int, seq_q: int, seq_k: int, is_causal: bool) -> RingLayout:
    """The layout ring_attention uses: zig-zag for causal requests, contiguous otherwise."""
    parts = 2 * size if is_causal else size
    return RingLayout(size, is_causal, seq_q // parts, seq_k // parts)


def _pair_can_attend(
    layout: RingLayout, qp: int, kp: int, spec: masks.MaskSpec, offsets: tuple[int, int] | None
) -> bool:
    """Whether some row of query piece qp may see some key of key piece kp (causal, window)."""
    if offsets is None or not (spec.is_causal or spec.window is not None):
        return True
    lq, lk = layout.piece_q, layout.piece_k
    rel_min = kp * lk - ((qp + 1) * lq - 1)  # smallest key − row in the pair
    rel_max = (kp + 1) * lk - 1 - qp * lq  # largest
    off_min, off_max = offsets
    hi = off_max
    if spec.window is not None:
        hi = min(hi, off_max + spec.window[1]) if spec.is_causal else off_max + spec.window[1]
        if rel_max < off_min - spec.window[0]:
            return False
    return rel_min <= hi


def ring_steps(
    layout: RingLayout, spec: masks.MaskSpec, offsets: tuple[int, int] | None
) -> list[int]:
    """The ring steps some device needs: step i brings device d the block of device d − i.

    `offsets` is the concrete (min, max) of q_offset, or None when it is traced (then every
    step is kept).
    """
    n = layout.size
    return [
        i
        for i in range(n)
        if any(
            _pair_can_attend(layout, qp, kp, spec, offsets)
            for d in range(n)
            for qp in layout.pieces(d)
            for kp in layout.pieces((d - i) % n)
        )
    ]


def ring_work(layout: RingLayout, spec: masks.MaskSpec, q_offset: int, tq: int, tk: int):
    """Chunk pairs each device computes over the whole ring (the core's kv_chunk_range), [n].

    The measure of load balance: under the causal zig-zag layout every device does the same.
    """
    work = np.zeros(layout.size, np.int64)
    nk = layout.piece_k // tk
    for d in range(layout.size):
        for src in range(layout.size):
            for qp in layout.pieces(d):
                for kp in layout.pieces(src):
                    arrays = masks.MaskArrays(
                        jnp.full((1,), q_offset, jnp.int32),
                        q_base=jnp.int32(qp * layout.piece_q),
                        k_base=jnp.int32(kp * layout.piece_k),
                    )
                    for c in range(layout.piece_q // tq):
                        lo, hi = masks.kv_chunk_range(spec, arrays, c * tq, tq, tk, nk)
                        work[d] += max(int(hi) - int(lo), 0)
    return work


class _Ring(NamedTuple):
    """Everything static about one ring call (hashable)."""

    axis_name: str
    layout: RingLayout
    steps: tuple[int, ...]
    st: chunked.Static  # the request, and the chunked contract's chunks
    kernel: Any = None  # the Pallas block contract's `Static`: each step runs the kernels


def _block_forward(ring: _Ring, ctx: dict, q, k, v, marr: masks.MaskArrays):
    """(out, lse) of one piece pair by the block contract the ring runs."""
    if ring.kernel is not None:
        from chunkattn.pallas import block  # imported by ring_attention already

        return block.block_forward(ring.kernel, q, k, v, marr)
    return chunked.block_forward(ring.st, q, k, v, None, ctx["score_params"], marr, ctx["seed"])


def _block_backward(ring: _Ring, ctx: dict, q, k, v, marr: masks.MaskArrays, out, lse, dout):
    """(dq, dk, dv, dscore_params) of one piece pair from the merged out and lse."""
    if ring.kernel is not None:
        from chunkattn.pallas import block

        return (*block.block_backward(ring.kernel, q, k, v, marr, out, lse, dout), ())
    zero_dlse = jnp.zeros(lse.shape, lse.dtype)
    dq, dk, dv, _, dparams = chunked.block_backward(
        ring.st, q, k, v, None, ctx["score_params"], marr, ctx["seed"], out, lse, dout, zero_dlse
    )
    return dq, dk, dv, dparams


def _split_pieces(ring: _Ring, x: Array | None) -> list[Array | None]:
    """A device's local array [B, L, ...] as its pieces along axis 1."""
    if x is None:
        return [None] * len(ring.layout.pieces(0))
    count = len(ring.layout.pieces(0))
    size = x.shape[1] // count
    return [jax.lax.slice_in_dim(x, i * size, (i + 1) * size, axis=1) for i in range(count)]


def _piece_ids(ring: _Ring, device: Array) -> list[Array]:
    n = ring.layout.size
    if ring.layout.zigzag:
        return [device, 2 * n - 1 - device]
    return [device]


def _shift(ring: _Ring, tree: Any, by: int) -> Any:
    """Send `tree` `by` devices along the ring (d -> d + by)."""
    n = ring.layout.size
    if by % n == 0:
        return tree
    perm = [(d, (d + by) % n) for d in range(n)]
    return jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, ring.axis_name, perm), tree)


def _block_arrays(ring: _Ring, ctx: dict, qp: Array, kp: Array, seg_q, seg_k):
    lay = ring.layout
    return masks.MaskArrays(
        q_offset=ctx["q_offset"],
        q_lengths=ctx["q_lengths"],
        kv_lengths=ctx["kv_lengths"],
        q_segment_ids=seg_q,
        kv_segment_ids=seg_k,
        mask_params=ctx["mask_params"],
        q_base=(qp * lay.piece_q).astype(jnp.int32),
        k_base=(kp * lay.piece_k).astype(jnp.int32),
    )


def _runs(steps: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive steps."""
    runs: list[tuple[int, int]] = []
    for step in steps:
        if runs and runs[-1][0] + runs[-1][1] == step:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((step, 1))
    return runs


def _visit(ring: _Ring, carry: Any, kv: Any, body: Callable[[Array, Any, Any], tuple]) -> tuple:
    """carry, kv = body(step, carry, kv) for every step of `ring.steps`, moving kv along the
    ring between steps (one `ppermute` per step, a longer one over skipped steps); the final
    move completes the circle, so accumulators travelling with kv get home.

    Each run of consecutive steps is one `fori_loop`: the program holds one step's blocks,
    whatever the ring size.
    """
    at = 0
    for first, count in _runs(ring.steps):
        kv = _shift(ring, kv, first - at)

        def one(t, state, first=first):
            carry, kv = body(first + t, *state)
            return carry, _shift(ring, kv, 1)

        carry, kv = jax.lax.fori_loop(0, count, one, (carry, kv))
        at = first + count
    return carry, _shift(ring, kv, -at)


def _ring_forward(ring: _Ring, q, k, v, seg_q, seg_k, ctx):
    batch, _, num_heads, _ = q.shape
    me = jax.lax.axis_index(ring.axis_name)
    n = ring.layout.size
    q_pieces, seg_q_pieces = _split_pieces(ring, q), _split_pieces(ring, seg_q)
    adt = accum_dtype(q.dtype)
    lq, hv = ring.layout.piece_q, v.shape[-1]
    sinks = ctx["sinks"]
    start = [row_start(sinks, batch, num_heads, lq, hv, adt) for _ in q_pieces]

    def body(step, accs, kv):
        kb, vb, sb = kv
        src = (me - step) % n
        accs = list(accs)
        for j, (kc, vc, sc) in enumerate(
            zip(*(_split_pieces(ring, x) for x in (kb, vb, sb)), strict=True)
        ):
            kp = _piece_ids(ring, src)[j]
            for i, (qc, sq) in enumerate(zip(q_pieces, seg_q_pieces, strict=True)):
                marr = _block_arrays(ring, ctx, _piece_ids(ring, me)[i], kp, sq, sc)
                out, lse = _block_forward(ring, ctx, qc, kc, vc, marr)
                # (out, lse) as a summary: exp_values = out·e^(lse−m), weights e^(lse−m), m = lse
                finite = jnp.isfinite(lse)
                part = ChunkSummary(
                    exp_values=jnp.where(
                        finite[..., None], jnp.swapaxes(out, 1, 2).astype(adt), 0.0
                    ),
                    exp_weights=finite.astype(adt),
                    max_score=lse,
                )
                accs[i] = merge(accs[i], part)
        return accs, kv

    accs, _ = _visit(ring, start, (k, v, seg_k), body)
    out = jnp.concatenate([a.output(q.dtype) for a in accs], axis=1)
    lse = jnp.concatenate([a.lse() for a in accs], axis=2)
    return out, lse


def _ring_backward(ring: _Ring, q, k, v, seg_q, seg_k, ctx, out, lse, dout):
    me = jax.lax.axis_index(ring.axis_name)
    n = ring.layout.size
    adt = accum_dtype(q.dtype)
    q_pieces, seg_q_pieces = _split_pieces(ring, q), _split_pieces(ring, seg_q)
    out_p, dout_p = _split_pieces(ring, out), _split_pieces(ring, dout)
    count, lq = len(q_pieces), ring.layout.piece_q
    lse_p = [jax.lax.slice_in_dim(lse, i * lq, (i + 1) * lq, axis=2) for i in range(count)]

    def body(step, carry, kv):
        dq, dparams = carry
        kb, vb, sb, dk_acc, dv_acc = kv
        src = (me - step) % n
        dq = list(dq)
        dks, dvs = [], []
        for j, (kc, vc, sc) in enumerate(
            zip(*(_split_pieces(ring, x) for x in (kb, vb, sb)), strict=True)
        ):
            kp = _piece_ids(ring, src)[j]
            dk_j = jnp.zeros(kc.shape, adt)
            dv_j = jnp.zeros(vc.shape, adt)
            for i in range(count):
                marr = _block_arrays(ring, ctx, _piece_ids(ring, me)[i], kp, seg_q_pieces[i], sc)
                dqb, dkb, dvb, dpb = _block_backward(
                    ring, ctx, q_pieces[i], kc, vc, marr, out_p[i], lse_p[i], dout_p[i]
                )
                dq[i] = dq[i] + dqb.astype(adt)
                dk_j, dv_j = dk_j + dkb.astype(adt), dv_j + dvb.astype(adt)
                dparams = tuple(a + b.astype(adt) for a, b in zip(dparams, dpb, strict=True))
            dks.append(dk_j)
            dvs.append(dv_j)
        dk_acc = dk_acc + jnp.concatenate(dks, axis=1)
        dv_acc = dv_acc + jnp.concatenate(dvs, axis=1)
        return (dq, dparams), (kb, vb, sb, dk_acc, dv_acc)

    dq0 = [jnp.zeros(x.shape, adt) for x in q_pieces]
    dparams0 = tuple(jnp.zeros(p.shape, adt) for p in ctx["score_params"])
    travel = (k, v, seg_k, jnp.zeros(k.shape, adt), jnp.zeros(v.shape, adt))
    (dq, dparams), (_, _, _, dk, dv) = _visit(ring, (dq0, dparams0), travel, body)
    dq = jnp.concatenate(dq, axis=1)
    dparams = tuple(g.astype(p.dtype) for g, p in zip(dparams, ctx["score_params"], strict=True))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dparams


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, seg_q, seg_k, ctx):
    return _ring_forward(ring, q, k, v, seg_q, seg_k, ctx)[0]


def _ring_fwd(ring, q, k, v, seg_q, seg_k, ctx):
    out, lse = _ring_forward(ring, q, k, v, seg_q, seg_k, ctx)
    return out, (q, k, v, seg_q, seg_k, ctx, out, lse)


def _ring_bwd(ring, res, dout):
    q, k, v, seg_q, seg_k, ctx, out, lse = res
    dq, dk, dv, dparams = _ring_backward(ring, q, k, v, seg_q, seg_k, ctx, out, lse, dout)
    # This device's rows' share of d sinks; shard_map's transpose sums the shares over the
    # mesh axes the (replicated) sinks and score_fn arrays are not split over.
    dsinks = None
    if ctx["sinks"] is not None:
        lse_res = jnp.where(jnp.isfinite(lse), lse, 0.0)
        dsinks = chunked.sink_gradient(ctx["sinks"], out, lse_res, dout, jnp.zeros_like(lse))
    none = lambda x: jax.tree_util.tree_map(lambda _: None, x)
    dctx = {name: none(value) for name, value in ctx.items()}
    dctx["sinks"], dctx["score_params"] = dsinks, dparams
    return dq, dk, dv, none(seg_q), none(seg_k), dctx


_ring.defvjp(_ring_fwd, _ring_bwd)


def _zigzag_perms(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The two ppermutes that re-deal contiguous shards into zig-zag order.

    Device s holds pieces 2s and 2s + 1 of 2n. Piece p goes to device p (first slot) when
    p < n, else to device 2n − 1 − p (second slot).
    """
    dest = lambda p: p if p < n else 2 * n - 1 - p
    return [(s, dest(2 * s)) for s in range(n)], [(s, dest(2 * s + 1)) for s in range(n)]


def _to_zigzag(x: Array, axis_name: str, n: int) -> Array:
    """Local contiguous shard (pieces 2d, 2d+1) -> local zig-zag shard (pieces d, 2n−1−d)."""
    if n == 1:  # pieces (0, 1) either way
        return x
    half = x.shape[1] // 2
    first, second = x[:, :half], x[:, half:]
    perm0, perm1 = _zigzag_perms(n)
    r0 = jax.lax.ppermute(first, axis_name, perm0)
    r1 = jax.lax.ppermute(second, axis_name, perm1)
    # Even d receives piece d from perm0 and 2n−1−d from perm1; odd d the other way round.
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.concatenate([jnp.where(even, r0, r1), jnp.where(even, r1, r0)], axis=1)


def _from_zigzag(x: Array, axis_name: str, n: int) -> Array:
    """Inverse of `_to_zigzag`."""
    if n == 1:
        return x
    half = x.shape[1] // 2
    even = jax.lax.axis_index(axis_name) % 2 == 0
    a, b = x[:, :half], x[:, half:]
    r0, r1 = jnp.where(even, a, b), jnp.where(even, b, a)  # what perm0 / perm1 delivered
    perm0, perm1 = _zigzag_perms(n)
    first = jax.lax.ppermute(r0, axis_name, [(t, s) for s, t in perm0])
    second = jax.lax.ppermute(r1, axis_name, [(t, s) for s, t in perm1])
    return jnp.concatenate([first, second], axis=1)


def _divisor_chunk(length: int, chunk: int) -> int:
    """The chunk size for a piece: the largest divisor of its length up to `chunk` (the
    pieces are not padded), or the whole piece when that divisor is under chunk / 8 (a prime
    length would otherwise run 1×1 chunks)."""
    best = max(d for d in range(1, chunk + 1) if length % d == 0)
    return best if best * 8 >= chunk else length


def _concrete_range(x: Any) -> tuple[int, int] | None:
    """(min, max) of a concrete integer array, None for None or a traced one."""
    if x is None or not is_concrete(x):
        return None
    values = np.asarray(x)
    return int(values.min()), int(values.max())


def _step_kernel(
    implementation: str | None,
    config: Any,
    request: chunked.Static,
    q: jax.ShapeDtypeStruct,
    k: jax.ShapeDtypeStruct,
    v: jax.ShapeDtypeStruct,
    segment_dtype: Any,
) -> Any:
    """What each ring step runs: the Pallas block contract's `Static` (the fused kernels), or
    None for the chunked block contract.

    `implementation=None` takes the kernels on a GPU backend when they serve the request (and
    `config` is not a ChunkConfig), the chunked core otherwise; a named implementation that
    cannot serve it raises NotImplementedError naming the feature, as dot_product_attention.
    """
    names = ("chunked",) if implementation == "chunked" else ("pallas",)
    if implementation is None:
        names = ("pallas", "chunked") if jax.default_backend() == "gpu" else ("chunked",)
    errors = []
    for name in names:
        try:
            if name == "chunked":
                if config is not None and not isinstance(config, chunked.ChunkConfig):
                    raise NotImplementedError(
                        f"the chunked core takes a ChunkConfig, got {type(config).__name__}"
                    )
                return None
            from chunkattn.pallas import block  # imported lazily: never at package import

            return block.block_static(request, q, k, v, segment_dtype=segment_dtype, config=config)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    what = "each ring step" if implementation is None else f"implementation={implementation!r}"
    raise NotImplementedError(f"ring_attention cannot run {what}: " + "; ".join(errors))


def ring_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    mesh: Mesh,
    axis_name: str,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    q_offset: int | Array = 0,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    mask_fn: Callable[..., Array] | None = None,
    score_fn: Callable[..., Array] | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    broadcast_dropout: bool = True,
    sinks: Array | None = None,
    precision: Any = None,
    implementation: str | None = None,
    config: chunked.ChunkConfig | PallasConfig | None = None,
    batch_axis: str | None = None,
    head_axis: str | None = None,
) -> Array:
    """Exact attention with the sequence sharded over `mesh` axis `axis_name` (ring attention).

    Takes the position-based options of `dot_product_attention`, with the same meaning at the
    same global positions, so the result equals the single-device one (dropout included, with
    the same rng): `is_causal`, `local_window_size` (ring steps outside the window are
    skipped), `q_offset`, `query_seq_lengths`, `key_value_seq_lengths`, `segment_ids`,
    `mask_fn`, `score_fn` (arrays they close over get gradients), `logits_soft_cap`, dropout,
    `sinks`, GQA. A dense `bias` or `mask` raises NotImplementedError naming it.

    Each ring step runs the fused Pallas (Triton) kernels on a GPU backend and the chunked core
    elsewhere (`implementation=None`); `implementation="pallas"` or `"chunked"` forces one.
    The kernels take positions as differences only, so a request with mask_fn, score_fn or
    dropout runs the chunked core under None and raises NotImplementedError under "pallas".

    Args:
      query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv] global arrays (sharded or
        not). T and S must divide evenly over the n devices of the axis, and over 2n for a
        causal mask (the zig-zag layout). K divides N (GQA).
      mesh, axis_name: the mesh and the axis the sequence is split over.
      implementation: None (the kernels on GPU, else chunked), "chunked", or "pallas".
      config: a ChunkConfig for the chunked core, or a PallasConfig for the kernels.
      batch_axis: a mesh axis the batch is sharded over too (data parallelism), or None.
      head_axis: a mesh axis the heads are sharded over too (tensor parallelism: query heads N
        and kv heads K both divide by its size, so each shard keeps whole GQA groups), or None.

    Returns:
      [B, T, N, Hv], sharded along T over `axis_name`.

    Example:
        >>> mesh = jax.make_mesh((8,), ("sp",))
        >>> out = ring_attention(q, k, v, mesh=mesh, axis_name="sp", is_causal=True)
    """
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            raise NotImplementedError(
                f"ring_attention does not implement a dense {name}; express it as mask_fn / "
                "score_fn of positions, or use dot_product_attention"
            )
    check_implementation(implementation, config)
    if implementation not in (None, "chunked", "pallas", "pallas_triton"):
        raise NotImplementedError(
            f"ring_attention runs the chunked core or the pallas kernels on each ring step; "
            f"implementation={implementation!r} per step is not implemented"
        )
    if np.ndim(query) != 4 or np.ndim(key) != 4 or np.ndim(value) != 4:
        raise ValueError(
            f"ring_attention takes [B, T, N, H] arrays, got query.shape={np.shape(query)}, "
            f"key.shape={np.shape(key)}, value.shape={np.shape(value)}"
        )
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    n = mesh.shape[axis_name]
    args = normalize_arguments(
        query,
        key,
        value,
        scale=scale,
        local_window_size=local_window_size,
        q_offset=q_offset,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        sinks=sinks,
    )
    batch, seq_q, num_heads, _ = args.query.shape
    seq_k = args.key.shape[1]
    if batch_axis is not None and (
        batch_axis not in mesh.shape or batch_axis == axis_name or batch % mesh.shape[batch_axis]
    ):
        raise ValueError(
            f"batch_axis={batch_axis!r} must be another axis of the mesh {dict(mesh.shape)} "
            f"whose size divides the batch of query.shape={args.query.shape}"
        )
    num_kv_heads = args.key.shape[2]
    if head_axis is not None and (
        head_axis not in mesh.shape
        or head_axis in (axis_name, batch_axis)
        or num_heads % mesh.shape[head_axis]
        or num_kv_heads % mesh.shape[head_axis]
    ):
        raise ValueError(
            f"head_axis={head_axis!r} must be another axis of the mesh {dict(mesh.shape)} whose "
            f"size divides the query heads N={num_heads} and the kv heads K={num_kv_heads}"
        )
    uses_indices = mask_fn is not None or score_fn is not None
    uses_indices |= dropout_rate > 0 and not broadcast_dropout
    for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis)):
        if axis is not None and uses_indices:
            raise NotImplementedError(
                f"ring_attention with {name} does not implement mask_fn, score_fn or "
                "broadcast_dropout=False (they see the batch and head indices, which are sharded)"
            )
    parts = 2 * n if is_causal else n
    if seq_q % parts or seq_k % parts:
        what = f"2n = {parts} (causal: the zig-zag layout)" if is_causal else f"{n} devices"
        raise ValueError(
            f"sequence lengths must divide evenly over {what} of axis {axis_name!r}: "
            f"query.shape={args.query.shape}, key.shape={args.key.shape}"
        )
    check_user_functions(mask_fn, score_fn, batch, num_heads, seq_q, seq_k)
    layout = ring_layout(n, seq_q, seq_k, is_causal)
    local_batch = batch // (mesh.shape[batch_axis] if batch_axis else 1)
    local_heads = num_heads // (mesh.shape[head_axis] if head_axis else 1)
    chunk_config = config if isinstance(config, chunked.ChunkConfig) else chunked.ChunkConfig()
    tq, tk = chunk_config.resolve(layout.piece_q, layout.piece_k, local_batch * local_heads)
    tq, tk = _divisor_chunk(layout.piece_q, tq), _divisor_chunk(layout.piece_k, tk)
    idx = index_shapes(local_batch, local_heads, tq, tk)
    block = jax.ShapeDtypeStruct((local_batch, local_heads, tq, tk), accum_dtype(args.query.dtype))
    score_fn, score_params = explicit_closure(score_fn, (block, *idx))
    mask_fn, mask_params = explicit_closure(mask_fn, idx)
    spec = masks.MaskSpec(is_causal, args.local_window_size, mask_fn)
    # The caller's q_offset, not the normalised one (a traced array under jit even when the
    # caller passed a Python int): a concrete offset lets the windowed ring skip steps.
    offsets = _concrete_range(
        np.broadcast_to(q_offset, (batch,)) if is_concrete(q_offset) else None
    )
    steps = ring_steps(layout, spec, offsets)
    request = chunked.Static(
        spec=spec,
        scale=args.scale,
        soft_cap=args.logits_soft_cap,
        score_fn=score_fn,
        dropout_rate=float(dropout_rate),
        broadcast_dropout=bool(broadcast_dropout),
        tq=tq,
        tk=tk,
        seq_k=layout.piece_k,
        precision=resolve_precision(precision, args.query.dtype),
    )
    local_kv_heads = num_kv_heads // (mesh.shape[head_axis] if head_axis else 1)
    piece = lambda x, length, heads: jax.ShapeDtypeStruct(
        (local_batch, length, heads, x.shape[-1]), x.dtype
    )
    kernel = _step_kernel(
        implementation,
        config,
        request,
        piece(args.query, layout.piece_q, local_heads),
        piece(args.key, layout.piece_k, local_kv_heads),
        piece(args.value, layout.piece_k, local_kv_heads),
        None if args.segment_ids is None else args.segment_ids[0].dtype,
    )
    ring = _Ring(axis_name=axis_name, layout=layout, steps=tuple(steps), st=request, kernel=kernel)
    seq = P(batch_axis, axis_name, head_axis)  # [B, T, N, H]
    ids = P(batch_axis, axis_name)  # [B, T] segment ids
    per_batch = P(batch_axis)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

    def place(x: Array, spec: P = seq) -> Array:
        sharding = NamedSharding(mesh, spec)
        if explicit:
            return jax.reshard(x, sharding)
        return jax.lax.with_sharding_constraint(x, sharding)

    seg_q, seg_k = args.segment_ids if args.segment_ids is not None else (None, None)
    sharded = [place(args.query), place(args.key), place(args.value)]
    sharded += [None if s is None else place(s, ids) for s in (seg_q, seg_k)]
    ctx = {
        "q_offset": args.q_offset,
        "q_lengths": args.query_seq_lengths,
        "kv_lengths": args.key_value_seq_lengths,
        "seed": args.dropout_seed,
        "sinks": args.sinks,
        "score_params": score_params,
        "mask_params": mask_params,
    }
    ctx_specs = {
        "q_offset": per_batch,
        "q_lengths": per_batch,
        "kv_lengths": per_batch,
        "seed": P(),
        "sinks": P(head_axis),
        "score_params": tuple(P() for _ in score_params),
        "mask_params": tuple(P() for _ in mask_params),
    }
    to_zz = functools.partial(_to_zigzag, axis_name=axis_name, n=n)
    from_zz = functools.partial(_from_zigzag, axis_name=axis_name, n=n)

    def local(q, k, v, seg_q, seg_k, ctx):
        if is_causal:  # the zig-zag layout balances the triangle
            q, k, v = to_zz(q), to_zz(k), to_zz(v)
            seg_q, seg_k = (None, None) if seg_q is None else (to_zz(seg_q), to_zz(seg_k))
        out = _ring(ring, q, k, v, seg_q, seg_k, ctx)
        return from_zz(out) if is_causal else out

    seg_spec = ids if seg_q is not None else None
    # One compiled program, also when called eagerly: its internal −inf (a row's empty
    # summary) never reaches jax.debug_infs, as in api._run.
    out = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(seq, seq, seq, seg_spec, seg_spec, ctx_specs),
            out_specs=seq,
            check_vma=False,
        )
    )(*sharded, ctx)
    return place(out)
