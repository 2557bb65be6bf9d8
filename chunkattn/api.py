"""`dot_product_attention`: the one public entry point, its input checks, and the dispatcher.

Every argument is validated at the boundary by `arguments.py` (ValueError naming the argument
and its shape) and normalised to 4-D (`normalize_arguments`). An implementation receives the
normalised `Arguments` and either serves the request or raises NotImplementedError naming the
feature it lacks; `implementation=None` then falls through to the next one in `_auto_order`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from chunkattn import chunked, masks, reference
from chunkattn.arguments import (
    Arguments,
    Options,
    check_implementation,
    check_user_functions,
    explicit_closure,
    index_shapes,
    normalize_arguments,
    resolve_precision,
)
from chunkattn.summary import accum_dtype

Array = jax.Array


def _pad_axis(x: Array | None, axis: int, size: int, value: Any = 0) -> Array | None:
    """Pad x along axis to `size` (no-op when already that size or when that dim is 1)."""
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _run_chunked(args: Arguments, opts: Options) -> tuple[Array, Array]:
    config = opts.config if opts.config is not None else chunked.ChunkConfig()
    if not isinstance(config, chunked.ChunkConfig):
        raise NotImplementedError(
            f"the chunked implementation takes a ChunkConfig, got {type(config).__name__}"
        )
    batch, seq_q = args.query.shape[:2]
    seq_k = args.key.shape[1]
    tq, tk = config.resolve(seq_q, seq_k, batch * args.query.shape[2])
    pq, pk = -(-seq_q // tq) * tq, -(-seq_k // tk) * tk
    marr = args.mask_arrays()
    marr = marr._replace(
        q_segment_ids=masks.pad_segment_ids(marr.q_segment_ids, pq),
        kv_segment_ids=masks.pad_segment_ids(marr.kv_segment_ids, pk),
        mask=_pad_axis(_pad_axis(marr.mask, 2, pq, False), 3, pk, False),
    )
    bias = _pad_axis(_pad_axis(args.bias, 2, pq), 3, pk)
    idx = index_shapes(batch, args.query.shape[2], tq, tk)
    block = jax.ShapeDtypeStruct(
        (batch, args.query.shape[2], tq, tk), accum_dtype(args.query.dtype)
    )  # the float32 (float64 under x64) score block
    score_fn, score_params = explicit_closure(opts.score_fn, (block, *idx))
    mask_fn, mask_params = explicit_closure(opts.mask_fn, idx)
    marr = marr._replace(mask_params=mask_params)
    st = chunked.Static(
        spec=masks.MaskSpec(opts.is_causal, args.local_window_size, mask_fn),
        scale=args.scale,
        soft_cap=args.logits_soft_cap,
        score_fn=score_fn,
        dropout_rate=opts.dropout_rate,
        broadcast_dropout=opts.broadcast_dropout,
        tq=tq,
        tk=tk,
        seq_k=seq_k,
        precision=opts.precision,
    )
    out, lse = chunked.attention(
        st,
        _pad_axis(args.query, 1, pq),
        _pad_axis(args.key, 1, pk),
        _pad_axis(args.value, 1, pk),
        bias,
        score_params,
        marr,
        args.dropout_seed,
        args.sinks,
    )
    return out[:, :seq_q], lse[:, :, :seq_q]


def _run_xla(args: Arguments, opts: Options) -> tuple[Array, Array]:
    return reference.dense_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        scale=args.scale,
        is_causal=opts.is_causal,
        local_window_size=args.local_window_size,
        q_offset=args.q_offset,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        segment_ids=args.segment_ids,
        mask_fn=opts.mask_fn,
        score_fn=opts.score_fn,
        logits_soft_cap=args.logits_soft_cap,
        dropout_rate=opts.dropout_rate,
        dropout_seed=args.dropout_seed,
        broadcast_dropout=opts.broadcast_dropout,
        sinks=args.sinks,
        precision=opts.precision,
    )


def _run_cudnn(args: Arguments, opts: Options, q_offset: Any, return_lse: bool) -> Array:
    """`jax.nn.dot_product_attention(implementation="cudnn")`, for requests it can serve.

    One API covers every backend a user compares: what cuDNN's fused attention lacks is
    refused with NotImplementedError naming it (it is never run by `implementation=None`).
    """
    offset_given = not (isinstance(q_offset, int) and q_offset == 0)
    missing = [
        name
        for name, present in (
            ("return_lse", return_lse),
            ("q_offset", offset_given),
            ("segment_ids", args.segment_ids is not None),
            ("mask_fn", opts.mask_fn is not None),
            ("score_fn", opts.score_fn is not None),
            ("logits_soft_cap", args.logits_soft_cap is not None),
            ("dropout", opts.dropout_rate > 0),
            ("sinks", args.sinks is not None),
            ("config", opts.config is not None),
            (
                f"{args.query.dtype} inputs (cuDNN takes bfloat16 or float16)",
                args.query.dtype not in (jnp.bfloat16, jnp.float16),
            ),
        )
        if present
    ]
    if missing:
        raise NotImplementedError(f"the cudnn implementation does not serve {', '.join(missing)}")
    if jax.default_backend() != "gpu":
        raise NotImplementedError("the cudnn implementation needs an NVIDIA GPU backend")
    return jax.nn.dot_product_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        scale=args.scale,
        is_causal=opts.is_causal,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        local_window_size=args.local_window_size,
        implementation="cudnn",
    )


def _run_pallas(args: Arguments, opts: Options) -> tuple[Array, Array]:
    from chunkattn import pallas  # imported lazily: never at package import

    return pallas.attention(args, opts)  # NotImplementedError off GPU unless interpreting


def _run_pallas_mosaic(args: Arguments, opts: Options) -> tuple[Array, Array]:
    """The Mosaic GPU (Hopper) forward with the Triton backward: experimental, never chosen by
    `implementation=None` until it has passed the GPU tests (chunkattn/pallas/mosaic.py)."""
    from chunkattn import pallas

    return pallas.attention(args, opts, kernel="mosaic")


def _run_pallas_tpu(args: Arguments, opts: Options) -> tuple[Array, Array]:
    """Our Pallas TPU flash kernels (chunkattn/tpu_flash.py): bias, mask, dropout and the rest."""
    from chunkattn import tpu_flash  # imported lazily: Pallas' TPU modules

    return tpu_flash.attention(args, opts)


_RUNNERS: dict[str, Callable[[Arguments, Options], tuple[Array, Array]]] = {
    "chunked": _run_chunked,
    "pallas": _run_pallas,
    "pallas_triton": _run_pallas,  # the same kernels as "pallas", named for their backend
    "pallas_mosaic": _run_pallas_mosaic,
    "pallas_tpu": _run_pallas_tpu,
    "xla": _run_xla,
}


def _auto_order() -> Sequence[str]:
    """Fastest first; each may decline with NotImplementedError."""
    if jax.default_backend() == "gpu":
        return ("pallas", "chunked")
    if jax.default_backend() == "tpu":
        return ("splash", "pallas_tpu", "chunked")
    return ("chunked",)


def _run_splash(
    args: Arguments, opts: Options, q_offset: Any, *, forced: bool
) -> tuple[Array, Array]:
    """Splash attention on TPU: its band mask is static, so q_offset must be one known int."""
    from chunkattn import splash  # imported lazily: Pallas' TPU kernels, never at package import

    return _run_splash_compiled(args, opts, splash.static_offset(q_offset), forced)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _run_splash_compiled(
    args: Arguments, opts: Options, offset: int, forced: bool
) -> tuple[Array, Array]:
    from chunkattn import splash

    return splash.attention(args, opts, offset, forced=forced)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
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
    return_lse: bool = False,
    precision: Any = None,
    implementation: str | None = None,
    config: Any = None,
) -> Array | tuple[Array, Array]:
    """Exact scaled dot-product attention in memory linear in the sequence length.

    Shapes: B batch, T query length, S key length, N query heads, K kv heads (K divides N),
    H head dim, Hv value head dim. 3-D inputs ([T, N, H]) are accepted and give 3-D outputs.

    Args:
      query: [B, T, N, H]. key: [B, S, K, H]. value: [B, S, K, Hv]. Same float dtype
        (float32, bfloat16, float16); scores and sums are float32, the output is in that dtype.
      bias: float, broadcastable to [B, N, T, S]; added to the scores; differentiable (its
        gradient has the bias's own shape). Sliced per chunk, never broadcast to [T, S].
      mask: bool, broadcastable to [B, N, T, S]; True = may attend.
      scale: multiplies q·kᵀ; default 1/√H.
      is_causal: query i sees key j iff j ≤ i + q_offset (top-left aligned).
      local_window_size: w or (left, right): query i sees keys i+q_offset−left … i+q_offset+right.
      q_offset: int or int [B]: position of query 0 in the key sequence (decoding with a cache).
      query_seq_lengths, key_value_seq_lengths: int [B]: queries/keys at or past these are padding.
      segment_ids: int [B, T] (self-attention) or ([B, T], [B, S]); only equal ids attend.
      mask_fn: (batch, head, q_pos, k_pos) -> bool, evaluated per chunk on broadcastable int32
        index arrays ([B,1,1,1], [1,N,1,1], [B,1,tq,1], [1,1,1,tk]); must be elementwise.
      score_fn: (score, batch, head, q_pos, k_pos) -> score on a float32 [B, N, tq, tk] block;
        must be elementwise. Applied after the soft cap and bias, before the masks.
      logits_soft_cap: scores become cap·tanh(s/cap) (before the bias).
      dropout_rate, dropout_rng, broadcast_dropout: dropout on the attention weights; the mask
        is a hash of (key, position), identical in the backward pass and for any chunking;
        with broadcast_dropout it is shared across batch and heads.
      sinks: float [N], one learnable logit per query head (attention sinks, as in gpt-oss):
        it joins every row's softmax denominator and carries no value, so
        out_i = Σ_j e^(s_ij) v_j / (e^(sink) + Σ_j e^(s_ij)); differentiable. A row that may
        attend no key then gives output 0 and lse = sink.
      return_lse: also return the log-sum-exp, float32 [B, N, T] (−inf for rows seeing no key).
      precision: passed to the matrix products; None means HIGHEST for float32 inputs (no
        TF32 on GPUs) and the backend default otherwise.
      implementation: None (fastest available), "chunked" (pure JAX, every backend), "pallas"
        (fused GPU kernels), "splash" (JAX's fused TPU kernel, for the requests it serves), "xla"
        (dense) or "cudnn" (`jax.nn.dot_product_attention`'s cuDNN kernel, for the requests it
        serves; never chosen by None). "pallas_triton" is "pallas" by its backend's name;
        "pallas_mosaic" is the experimental Hopper (Mosaic GPU) forward kernel with the Triton
        backward (config: `MosaicConfig`), never chosen by None until it has run on a GPU.
        "pallas_tpu" is our own Pallas TPU FlashAttention (config: `TpuFlashConfig`): what
        splash declines (a dense bias with its gradient, a dense mask, dropout, a per-batch or
        traced q_offset, mask_fn / score_fn not closing over arrays); on a TPU None tries
        splash, then it, then "chunked".
      config: the implementation's config, e.g. `ChunkConfig(q_chunk_size=..., kv_chunk_size=...)`.

    Returns:
      [B, T, N, Hv] in the input dtype, or (out, lse) with return_lse. A query that may attend no
      key gets output 0, lse −inf and zero gradient.

    Raises:
      ValueError: a malformed argument (the message names it and its shape).
      NotImplementedError: the named implementation cannot serve this request.

    Example:
        >>> q = k = v = jnp.ones((2, 4096, 8, 64), jnp.bfloat16)
        >>> out = chunkattn.dot_product_attention(q, k, v, is_causal=True)
    """
    check_implementation(implementation, config)
    args = normalize_arguments(
        query,
        key,
        value,
        bias,
        mask,
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
    check_user_functions(mask_fn, score_fn, batch, num_heads, seq_q, args.key.shape[1])
    if args.empty:  # zero-size B, N, T or S: nothing to compute, as jax.nn returns
        return args.finish(*args.empty_result(), return_lse)
    opts = Options(
        is_causal=bool(is_causal),
        mask_fn=mask_fn,
        score_fn=score_fn,
        dropout_rate=float(dropout_rate),
        broadcast_dropout=bool(broadcast_dropout),
        precision=resolve_precision(precision, args.query.dtype),
        config=config,
    )
    names = (implementation,) if implementation is not None else _auto_order()
    errors = []
    for name in names:
        try:
            if name == "cudnn":
                return args.finish(_run_cudnn(args, opts, q_offset, return_lse), None, False)
            if name == "splash":
                out, lse = _run_splash(args, opts, q_offset, forced=implementation is not None)
                return args.finish(out, lse, return_lse)
            out, lse = _run(name, args, opts)
            return args.finish(out, lse, return_lse)
        except NotImplementedError as e:
            if implementation is not None:
                raise
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no implementation can serve this request: " + "; ".join(errors))


@functools.partial(jax.jit, static_argnames=("name", "opts"))
def _run(name: str, args: Arguments, opts: Options) -> tuple[Array, Array]:
    """One implementation, compiled as one program.

    Under `jax.debug_infs` / `jax.debug_nans` only a compiled program's outputs are checked, so
    the internal −inf of masked scores never trips them; eager calls reuse the compilation.
    """
    return _RUNNERS[name](args, opts)
