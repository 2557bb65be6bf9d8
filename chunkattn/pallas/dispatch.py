"""The kernels behind one normalised request: `attention(args, opts)`, the entry `api.py`
calls, pads the inputs to whole blocks, chooses the blocks (`config.heuristic`), builds
`Static` and the `META` columns, and runs `flash_attention`, the custom_vjp that pairs the
forward kernel with the backward kernels (the sinks' gradient from `chunked.sink_gradient`).

What the kernels cannot do raises NotImplementedError naming the feature, and
`dot_product_attention(implementation=None)` falls back to the chunked path: float64, head
dims above 256, 64-bit segment ids, a second derivative, and a `mask_fn`/`score_fn` that closes
over arrays or uses an operation the Triton lowering lacks (checked on its jaxpr by
`user_fns.check_user_fns`).

`attention(args, opts, kernel="mosaic")` (`implementation="pallas_mosaic"`, experimental) runs
the Mosaic GPU forward of `mosaic.py` instead of the Triton one, for the requests it serves
(`mosaic.unsupported_features`; a mask_fn / score_fn also `mosaic.check_user_fns`), and keeps
the Triton backward kernels: the custom_vjp below is the same, only `_first_order_forward`
picks the kernel (`Static.mosaic`). With `MosaicConfig(backward=MosaicBackwardConfig())` the
Mosaic GPU backward of `mosaic_backward.py` replaces the Triton one (`Plan.backward`;
experimental; it declines a mask_fn / score_fn).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from chunkattn import chunked, masks
from chunkattn.pallas import mosaic, mosaic_backward
from chunkattn.pallas.backward import backward, bias_gradient
from chunkattn.pallas.config import PallasConfig, block_width, heuristic, interpret_mode
from chunkattn.pallas.forward import forward
from chunkattn.pallas.kernel_common import F32_MAX, Array, Dims, Static, pad_to
from chunkattn.pallas.user_fns import check_user_fns


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
    if st.mosaic is not None:  # the Mosaic GPU kernel (no bias, dense mask or dropout)
        return mosaic.forward(
            st.mosaic, q, k, v, meta, marr.q_segment_ids, marr.kv_segment_ids, sinks
        )
    return forward(st, q, k, v, bias, meta, marr, sinks)


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
    if st.mosaic is not None and st.mosaic.backward is not None:  # no bias with Mosaic
        segs = marr.q_segment_ids, marr.kv_segment_ids
        dq, dk, dv = mosaic_backward.backward(st.mosaic, q, k, v, meta, *segs, out, lse, dout, dlse)
    else:
        dq, dk, dv = backward(st, q, k, v, bias, meta, marr, out, lse, dout, dlse)
    dbias = None
    if bias is not None:
        dbias = bias_gradient(st, q, k, v, bias, meta, marr, seed, out, lse, dout, dlse)
    # The sink's dS = P_sink·(0 − D): one reduction over rows, beside D's (rows whose residual
    # lse is F32_MAX, padding included, saw neither key nor sink in the kernel: P_sink = 0).
    dsinks = None if sinks is None else chunked.sink_gradient(sinks, out, lse, dout, dlse)
    no_grad = jax.tree_util.tree_map(lambda _: None, (marr, seed))
    return dq, dk, dv, dbias, None, *no_grad, dsinks


_first_order_bwd.defjvp(_no_forward_jvp)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------- entry


def _pad_dense(x: Array, pq: int, pk: int, value: Any) -> Array:
    """A [b, n, t, s] bias/mask padded to (pq, pk) on its full dims; broadcast dims stay 1."""
    if x.shape[2] != 1:
        x = pad_to(x, 2, pq, value)
    return x if x.shape[3] == 1 else pad_to(x, 3, pk, value)


def _lowerable_primitives() -> set[str] | None:
    """Names of the primitives the Triton lowering implements (None: unknown, assume all)."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:  # pragma: no cover - private module moved
        return None
    return {str(p) for p in lowering.triton_lowering_rules}


def _check_user_fns(opts: Any, bq: int, bk: int) -> None:
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    check_user_fns(
        opts.mask_fn,
        opts.score_fn,
        (i32(1, 1), i32(1, 1), i32(bq, 1), i32(1, bk)),
        jax.ShapeDtypeStruct((bq, bk), jnp.float32),
        lowerable=_lowerable_primitives(),
    )


def _dims(x: Array | None) -> Dims | None:
    """Which of a dense [b, n, t, s] operand's dims the kernels index (S also when T and S are
    both broadcast: `extra_inputs` widens it)."""
    if x is None:
        return None
    b, n, t, s = (d != 1 for d in x.shape)
    return b, n, t, s or not t


def attention(args: Any, opts: Any, kernel: str = "triton") -> tuple[Array, Array]:
    """Serve a normalised request (`arguments.Arguments`, `arguments.Options`) in the kernels.

    `kernel`: "triton" (the forward and backward kernels of forward.py/backward.py) or "mosaic"
    (the Mosaic GPU forward of mosaic.py, experimental, with the Triton backward).
    Raises NotImplementedError naming the feature for what the kernels do not implement.
    """
    interpret = interpret_mode()
    name = "pallas_mosaic" if kernel == "mosaic" else "pallas"
    if jax.default_backend() != "gpu" and not interpret:
        raise NotImplementedError(f"the {name} implementation needs a GPU backend")
    mosaic_cfg = None
    if kernel == "mosaic":
        missing = mosaic.unsupported_features(args, opts)
        if missing:
            raise NotImplementedError(
                f"the pallas_mosaic kernel does not implement {', '.join(missing)}"
            )
        mosaic_cfg = opts.config if opts.config is not None else mosaic.MosaicConfig()
        if not isinstance(mosaic_cfg, mosaic.MosaicConfig):
            raise NotImplementedError(
                f"the pallas_mosaic implementation takes a MosaicConfig, got "
                f"{type(mosaic_cfg).__name__}"
            )
        dims = (args.query.shape[-1], args.value.shape[-1])
        block_k = mosaic_cfg.resolve_block_k(dims)
        mosaic.check_user_fns(opts.mask_fn, opts.score_fn, mosaic_cfg.block_q, block_k)
        bwd_plan, triton_cfg = None, mosaic_cfg.backward
        if isinstance(mosaic_cfg.backward, mosaic_backward.MosaicBackwardConfig):
            missing = mosaic_backward.unsupported_features(dims)
            user = (("mask_fn", opts.mask_fn), ("score_fn", opts.score_fn))
            missing += [f"{name} in the Mosaic backward" for name, fn in user if fn is not None]
            if missing:
                raise NotImplementedError(
                    f"the pallas_mosaic kernel does not implement {', '.join(missing)}"
                )
            bwd_plan, triton_cfg = mosaic_backward.plan_for(mosaic_cfg.backward), PallasConfig()
        opts = dataclasses.replace(opts, config=triton_cfg)
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
    blocks = heuristic(max(hp, hvp), q.dtype, seq_q, seq_k, cfg, dense_tiles, opts.precision)
    _check_user_fns(opts, blocks["block_q"], blocks["block_k"])
    tq = max(blocks["block_q"], blocks["block_q_bwd"])
    tk = max(blocks["block_k"], blocks["block_k_bwd"])
    plan = None
    if mosaic_cfg is not None:  # powers of two: the larger is a multiple of the other
        plan = mosaic.Plan(
            scale=args.scale,
            soft_cap=args.logits_soft_cap,
            has_segments=args.segment_ids is not None,
            has_sinks=args.sinks is not None,
            groups=num_heads // num_kv_heads,
            head_dims=(head_dim, head_dim_v),
            block_q=mosaic_cfg.block_q,
            block_k=mosaic_cfg.resolve_block_k((head_dim, head_dim_v)),
            num_stages=mosaic_cfg.num_stages,
            interpret=interpret,
            backward=bwd_plan,
            mask_fn=opts.mask_fn,
            score_fn=opts.score_fn,
        )
        tq, tk = max(tq, mosaic.COMPUTE_WGS * plan.block_q), max(tk, plan.block_k)
        if bwd_plan is not None:
            pad_q, pad_k = mosaic_backward.padding(bwd_plan)
            tq, tk = max(tq, pad_q), max(tk, pad_k)
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
        q_segment_ids=None if marr.q_segment_ids is None else pad_to(marr.q_segment_ids, 1, pq),
        kv_segment_ids=None if marr.kv_segment_ids is None else pad_to(marr.kv_segment_ids, 1, pk),
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
        mosaic=plan,
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
    qp, kp, vp = pad_to(q, 1, pq), pad_to(k, 1, pk), pad_to(v, 1, pk)  # head dims: in-kernel
    out, lse = flash_attention(st, qp, kp, vp, bias, meta, marr, seed, args.sinks)
    out, lse = out[:, :seq_q], lse[:, :, :seq_q]
    if args.sinks is not None:  # padding queries (past query_seq_lengths) attend to the sink
        pad_rows = jnp.arange(seq_q)[None, None, :] >= meta[:, 1][:, None, None]
        lse = jnp.where(pad_rows, args.sinks.astype(jnp.float32)[None, :, None], lse)
    return out, lse
