"""Splash attention, JAX's fused TPU kernel, behind chunkattn's API (`implementation="splash"`).

`jax.experimental.pallas.ops.tpu.splash_attention` is a block-sparse FlashAttention for TPUs.
This module translates a normalised request (`arguments.Arguments` / `Options`) into it:

- causal, `local_window_size` and a static `q_offset` become one band of keys per row,
  `q − lo ≤ k ≤ q + hi` (splash's `LocalMask`, with bounds that cannot wrap int32); splash
  skips the blocks outside the band, with the band computed on the host once per shape;
- segment ids, `query_seq_lengths`, `key_value_seq_lengths` and the padding to whole blocks
  become splash's segment ids (a query or key that must see nothing gets an id no key or
  query has);
- GQA runs the MQA kernel once per kv head (vmapped), soft cap and sinks are splash's own;
- the log-sum-exp is returned with its gradient: the forward keeps splash's lse residual,
  and the backward runs splash's dK/dV (and dQ) kernels with D = rowsum(dO∘O) − dlse, the
  same algebra as `chunked.py`'s backward.

A row that may attend no key gives output 0 and lse −inf (or its sink), as every path does.
Splash marks masked scores with a finite value (`MASK_VALUE`), so such a row comes out of the
kernel with an lse near that value; it is recognised by `lse < MASK_VALUE / 2` and fixed here.

Declined with NotImplementedError naming the feature (`implementation=None` then falls back to
the chunked path): dense bias or mask, dropout, score_fn / mask_fn, a traced or per-batch
q_offset, float16 (Mosaic TPU has no float16 matrix unit), float64, and for
`implementation=None` float32 at HIGHEST precision (splash takes no precision argument; forced
with `implementation="splash"`, float32 runs at Mosaic's default). Splash needs a TPU, or the
Pallas interpreter (CHUNKATTN_PALLAS_INTERPRET=1, the CPU tests); forced on another host it
still traces, so that `jax.export(..., platforms=["tpu"])` lowers it for a TPU.

splash's forward and backward kernels are called through its module-level functions
(`_splash_attention_forward`, `_splash_attention_bwd_dkv`, `_splash_attention_bwd_dq`): its
public kernel object has no gradient for the lse. Their signatures are the same in jax 0.10.2,
0.11.2 and 0.12.0.1 (tests/test_splash.py exercises them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from chunkattn.arguments import INT32_MIN, Arguments, Options, first_order_only, is_concrete

Array = jax.Array

LANES = 128  # splash's blocks are multiples of the TPU's 128 lanes
MASK_VALUE = float(sk.DEFAULT_MASK_VALUE)  # −0.7 · float32 max: a masked score inside splash


@dataclasses.dataclass(frozen=True)
class SplashConfig:
    """Block sizes of the splash kernels (multiples of 128; each is clipped to the padded length).

    block_q / block_kv tile the forward; block_kv_compute is the key slice one inner step
    multiplies (it divides block_kv); the backward uses the same blocks. fused_backward runs
    dQ inside the dK/dV kernel (one pass over the blocks) instead of a second kernel.
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512
    fused_backward: bool = True

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_kv_compute"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % LANES:
                raise ValueError(
                    f"SplashConfig.{name} must be a positive multiple of 128, got {value!r}"
                )
        if self.block_kv % self.block_kv_compute:
            raise ValueError(
                f"SplashConfig.block_kv_compute must divide block_kv, got {self.block_kv_compute} "
                f"and {self.block_kv}"
            )


def _block(length: int, want: int) -> int:
    """The largest multiple of 128 dividing `length` (a multiple of 128) that is ≤ want."""
    return max(b for b in range(LANES, min(want, length) + 1, LANES) if length % b == 0)


def static_offset(q_offset: Any) -> int:
    """The request's q_offset as one Python int (splash's masks are static)."""
    if not is_concrete(q_offset):
        raise NotImplementedError("the splash implementation does not serve a traced q_offset")
    values = np.unique(np.asarray(q_offset))
    if values.size > 1:
        raise NotImplementedError("the splash implementation does not serve a per-batch q_offset")
    return int(values[0]) if values.size else 0


def band(
    is_causal: bool, window: tuple[int, int] | None, offset: int, seq_q: int, seq_k: int
) -> tuple[int | None, int | None]:
    """Query i may see keys i − lo ≤ k ≤ i + hi (None: that side is open), in Python integers.

    The bounds are clipped to what the shape can reach, so that splash's int32 arithmetic on
    positions below T + S cannot wrap, whatever the window or offset (2^31 − 1 means no limit).
    """
    lo = hi = None  # k ≥ i − lo, k ≤ i + hi
    if window is not None:
        lo, hi = window[0] - offset, window[1] + offset
    if is_causal:
        hi = offset if hi is None else min(hi, offset)
    if lo is not None and lo >= seq_q - 1:  # every row's band starts at or before key 0
        lo = None
    if hi is not None and hi >= seq_k - 1:  # every row's band reaches the last key
        hi = None
    # A band that leaves every row empty stays empty within the shape's reach.
    if lo is not None:
        lo = max(lo, -(seq_k + 1))
    if hi is not None:
        hi = max(hi, -(seq_q + 1))
    return lo, hi


@functools.lru_cache(maxsize=32)
def _kernel(
    seq_q: int,
    seq_k: int,
    groups: int,
    lo: int | None,
    hi: int | None,
    blocks: tuple[int, int, int],
    fused_backward: bool,
    soft_cap: float | None,
    interpret: bool,
) -> sk.SplashAttentionKernel:
    """splash's kernel object for one shape and band: its block-sparsity tables and settings."""
    if lo is None and hi is None:
        one = sm.FullMask((seq_q, seq_k))
    else:
        one = sm.LocalMask((seq_q, seq_k), window_size=(lo, hi), offset=0)
    bq, bkv, bkv_compute = blocks
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv_compute,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv_compute,
        block_q_dq=None if fused_backward else bq,
        block_kv_dq=None if fused_backward else bkv,
        use_fused_bwd_kernel=fused_backward,
    )
    with jax.ensure_compile_time_eval():  # concrete tables, never a trace's tracers (cached)
        return sk.make_splash_mqa_single_device(
            sm.MultiHeadMask([one] * groups),
            block_sizes=sizes,
            attn_logits_soft_cap=soft_cap,
            mask_value=MASK_VALUE,
            interpret=interpret,
        )


def _settings(kernel: sk.SplashAttentionKernel) -> dict[str, Any]:
    kw = kernel.kwargs
    return dict(
        mask_value=kw["mask_value"],
        attn_logits_soft_cap=kw["attn_logits_soft_cap"],
        mask_function=kw["mask_function"],
        interpret=kw["interpret"],
    )


def _forward_one(kernel, q, k, v, q_seg, kv_seg, sinks):
    """One (batch, kv head): q [G, Tp, H], k [Sp, H], v [Sp, Hv] -> out, lse [G, Tp]."""
    segments = None if q_seg is None else sk.SegmentIds(q_seg, kv_seg)
    out, (lse,) = sk._splash_attention_forward(
        kernel.fwd_mask_info,
        q,
        k,
        v,
        segments,
        sinks,
        is_mqa=True,
        block_sizes=kernel.kwargs["block_sizes"],
        residual_checkpoint_name=None,
        save_residuals=True,
        **_settings(kernel),
    )
    return out, lse


def _backward_one(kernel, q, k, v, q_seg, kv_seg, sinks, lse, dout, di):
    """dq, dk, dv of one (batch, kv head), given D = rowsum(dO∘O) − dlse per row."""
    segments = None if q_seg is None else sk.SegmentIds(q_seg, kv_seg)
    sizes = kernel.kwargs["block_sizes"]
    settings = _settings(kernel)
    layouts = dict(q_layout=sizes.q_layout, k_layout=sizes.k_layout, v_layout=sizes.v_layout)
    dq, dk, dv = sk._splash_attention_bwd_dkv(
        q,
        k,
        v,
        segments,
        sinks,
        lse,
        dout,
        di,
        bq=sizes.block_q_dkv,
        bkv=sizes.block_kv_dkv,
        bkv_compute=sizes.block_kv_dkv_compute,
        is_mqa=True,
        mask_info=kernel.dkv_mask_info,
        use_fused_bwd_kernel=sizes.use_fused_bwd_kernel,
        **layouts,
        **settings,
    )
    if not sizes.use_fused_bwd_kernel:
        dq = sk._splash_attention_bwd_dq(
            q,
            k,
            v,
            segments,
            sinks,
            lse,
            dout,
            di,
            bq=sizes.block_q_dq,
            bkv=sizes.block_kv_dq,
            is_mqa=True,
            mask_info=kernel.dq_mask_info,
            **layouts,
            **settings,
        )
    return dq, dk, dv


def _batched(fn, kernel, per_row: int):
    """fn over kv heads and batch: (q, k, v, q_seg, kv_seg, sinks, *per_row arrays).

    q/k/v and the per-row arrays carry [B, K, ...]; the segment ids [B, ...]; sinks [K, G].
    """
    heads = jax.vmap(
        functools.partial(fn, kernel), in_axes=(0, 0, 0, None, None, 0) + (0,) * per_row
    )
    return jax.vmap(heads, in_axes=(0, 0, 0, 0, 0, None) + (0,) * per_row)


def _splash(kernel, q, k, v, q_seg, kv_seg, sinks):
    """(out [B, K, G, Tp, Hv], lse f32 [B, K, G, Tp]) with the lse's gradient."""
    forward = first_order_only(_batched(_forward_one, kernel, 0), "splash")
    backward = first_order_only(_batched(_backward_one, kernel, 3), "splash")

    @jax.custom_vjp
    def run(q, k, v, q_seg, kv_seg, sinks):
        return forward(q, k, v, q_seg, kv_seg, sinks)

    def fwd(q, k, v, q_seg, kv_seg, sinks):
        out, lse = forward(q, k, v, q_seg, kv_seg, sinks)
        return (out, lse), (q, k, v, q_seg, kv_seg, sinks, out, lse)

    def bwd(res, cotangents):
        q, k, v, q_seg, kv_seg, sinks, out, lse = res
        dout, dlse = cotangents
        # D in float32 by a product and a sum: an einsum runs as bfloat16 passes on TPU.
        di = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
        dq, dk, dv = backward(q, k, v, q_seg, kv_seg, sinks, lse, dout.astype(out.dtype), di)
        # d sink = Σ_rows P_sink·(dlse − rowsum(dO∘O)) = −Σ P_sink·D, P_sink = exp(sink − lse).
        p_sink = jnp.exp(sinks[None, :, :, None] - lse)  # a user's sink may be −inf
        dsinks = -jnp.sum(jnp.where(jnp.isfinite(p_sink), p_sink, 0.0) * di, axis=(0, 3))
        return dq, dk, dv, None, None, dsinks.astype(sinks.dtype)

    run.defvjp(fwd, bwd)
    return run(q, k, v, q_seg, kv_seg, sinks)


def _segment_ids(args: Arguments, pq: int, pk: int) -> tuple[Array | None, Array | None]:
    """splash segment ids [B, Tp], [B, Sp]: the user's, with every query or key that must see
    nothing (past a length, or padding) given an id that no key or query carries."""
    batch, seq_q = args.query.shape[:2]
    seq_k = args.key.shape[1]
    if (
        args.segment_ids is None
        and args.query_seq_lengths is None
        and args.key_value_seq_lengths is None
        and (pq, pk) == (seq_q, seq_k)
    ):
        return None, None
    if args.segment_ids is not None:
        q_ids, k_ids = (s.astype(jnp.int32) for s in args.segment_ids)
        q_ids = jnp.broadcast_to(q_ids, (batch, seq_q))
        k_ids = jnp.broadcast_to(k_ids, (batch, seq_k))
        low = jnp.minimum(q_ids.min(), k_ids.min())
        high = jnp.maximum(q_ids.max(), k_ids.max())
        # Two ids below the smallest, or (when that would wrap) above the largest.
        wraps = low < INT32_MIN + 2
        no_query = jnp.where(wraps, high + 1, low - 1)
        no_key = jnp.where(wraps, high + 2, low - 2)
    else:
        q_ids = jnp.zeros((batch, seq_q), jnp.int32)
        k_ids = jnp.zeros((batch, seq_k), jnp.int32)
        no_query, no_key = jnp.int32(-1), jnp.int32(-2)
    q_pos = jnp.arange(pq)[None, :]
    k_pos = jnp.arange(pk)[None, :]
    q_len = seq_q if args.query_seq_lengths is None else args.query_seq_lengths[:, None]
    k_len = seq_k if args.key_value_seq_lengths is None else args.key_value_seq_lengths[:, None]
    q_ids = jnp.pad(q_ids, ((0, 0), (0, pq - seq_q)))
    k_ids = jnp.pad(k_ids, ((0, 0), (0, pk - seq_k)))
    q_ids = jnp.where((q_pos < q_len) & (q_pos < seq_q), q_ids, no_query)
    k_ids = jnp.where((k_pos < k_len) & (k_pos < seq_k), k_ids, no_key)
    return q_ids.astype(jnp.int32), k_ids.astype(jnp.int32)


def _check(args: Arguments, opts: Options, forced: bool) -> None:
    dtype = args.query.dtype
    unsupported = [
        ("a dense bias", args.bias is not None),
        ("a dense mask", args.mask is not None),
        ("dropout", opts.dropout_rate > 0),
        ("score_fn", opts.score_fn is not None),
        ("mask_fn", opts.mask_fn is not None),
        ("float16 (Mosaic TPU has no float16 matrix unit; use bfloat16)", dtype == jnp.float16),
        ("float64", dtype == jnp.float64),
        (
            "64-bit segment ids",
            args.segment_ids is not None and args.segment_ids[0].dtype.itemsize > 4,
        ),
        (
            "float32 at HIGHEST precision (splash takes no precision argument; force it with "
            "implementation='splash' to run float32 at Mosaic's default)",
            not forced and dtype == jnp.float32 and opts.precision == jax.lax.Precision.HIGHEST,
        ),
    ]
    missing = [name for name, present in unsupported if present]
    if missing:
        raise NotImplementedError(f"the splash implementation does not serve {', '.join(missing)}")
    if opts.config is not None and not isinstance(opts.config, SplashConfig):
        raise NotImplementedError(
            f"the splash implementation takes a SplashConfig, got {type(opts.config).__name__}"
        )


def attention(args: Arguments, opts: Options, offset: int, *, forced: bool) -> tuple[Array, Array]:
    """Serve a normalised request in splash: (out [B, T, N, Hv], lse f32 [B, N, T]).

    `offset` is the request's q_offset as one int (`static_offset`: splash's band is built on
    the host); `forced` is True when the user asked for implementation="splash".
    """
    from chunkattn.pallas.config import interpret_mode  # the same interpreter switch

    _check(args, opts, forced)
    cfg = opts.config if opts.config is not None else SplashConfig()
    q, k, v = args.query, args.key, args.value
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    groups = num_heads // num_kv_heads
    pq, pk = -(-seq_q // LANES) * LANES, -(-seq_k // LANES) * LANES
    blocks = (
        _block(pq, cfg.block_q),
        _block(pk, cfg.block_kv),
        _block(_block(pk, cfg.block_kv), cfg.block_kv_compute),
    )
    lo, hi = band(opts.is_causal, args.local_window_size, offset, seq_q, seq_k)
    kernel = _kernel(
        pq, pk, groups, lo, hi, blocks, cfg.fused_backward, args.logits_soft_cap, interpret_mode()
    )
    q_seg, kv_seg = _segment_ids(args, pq, pk)
    # [B, T, N, H] -> [B, K, G, Tp, H]; splash has no scale, so q carries it.
    qs = (q.astype(jnp.float32) * args.scale).astype(q.dtype)
    qs = jnp.pad(qs, ((0, 0), (0, pq - seq_q), (0, 0), (0, 0)))
    qs = qs.reshape(batch, pq, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    ks, vs = (
        jnp.pad(x, ((0, 0), (0, pk - seq_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v)
    )
    # With no sinks, a sink at MASK_VALUE: it weighs nothing beside any real score, and a row
    # splash never visits ends with l = 1, output 0 and lse = MASK_VALUE, fixed below (splash's
    # own start, l = 0, would divide 0 by 0 there). Nothing inside is infinite.
    sinks = args.sinks if args.sinks is not None else jnp.full((num_heads,), MASK_VALUE)
    sinks = sinks.astype(jnp.float32).reshape(num_kv_heads, groups)
    if args.sinks is None:
        sinks = jax.lax.stop_gradient(sinks)
    out, lse = _splash(kernel, qs, ks, vs, q_seg, kv_seg, sinks)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, pq, num_heads, head_dim_v)[:, :seq_q]
    lse = lse.reshape(batch, num_heads, pq)[:, :, :seq_q]
    # Rows that saw only masked scores: output 0, lse = their sink (−inf without sinks).
    saw_key = lse > MASK_VALUE / 2
    no_key = (
        args.sinks.astype(jnp.float32)
        if args.sinks is not None
        else jnp.full((num_heads,), -jnp.inf)
    )
    no_key_lse = jnp.broadcast_to(no_key.reshape(1, num_heads, 1), lse.shape)
    out = jnp.where(saw_key.transpose(0, 2, 1)[..., None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(saw_key, lse, no_key_lse)
    return out.astype(q.dtype), lse
