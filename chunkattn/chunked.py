"""The pure-JAX chunked core: exact attention in O(T + S) memory, forward and backward.

Forward: a loop over query chunks; for each, a loop over only the key chunks that can contribute
(`masks.kv_chunk_range`), carrying a `ChunkSummary` merged by log-sum-exp (`summary.merge`).
Output and the log-sum-exp are written chunk by chunk into preallocated buffers.

Backward (`jax.custom_vjp`, FlashAttention-2, arXiv 2307.08691 §3.1): residuals are only
q, k, v, bias, out and lse. With D = rowsum(dO ∘ O), per block P = exp(s − lse),
dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − D + dlse), dQ += scale·dS·K, dK += scale·dSᵀ·Q
(dropout, score_fn and the soft cap chain-rule through dS). A loop over key chunks carries the
chunk's dK, dV in float32; the inner loop over the query chunks that can see it adds into a
float32 dQ buffer of the query's size.

Inputs here are normalised 4-D arrays already padded to whole chunks (see `api.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from chunkattn import masks
from chunkattn.summary import (
    ChunkSummary,
    accum_dtype,
    grouped_heads,
    keys_transposed,
    kv_heads_major,
    merge,
    output_delta,
    row_start,
    scores_grouped,
    summarize_scores,
    transposed_times,
    ungrouped_heads,
    weights_times_values,
)

Array = jax.Array

# Default chunk sizes per backend, chosen from measurements (bench/NOTES.md, bench/results/
# chunk_sizes_*.csv). Larger chunks amortise loop overhead, but a block's float32 temporaries are
# B·N·tq·tk elements each, so the default shrinks chunks to stay under a per-block element budget.
_DEFAULT_CHUNKS: dict[str, tuple[int, int]] = {"cpu": (512, 512), "gpu": (2048, 2048)}
_FALLBACK_CHUNKS = (512, 512)
_BLOCK_ELEMENT_BUDGET: dict[str, int] = {"cpu": 2**24, "gpu": 2**28}
_MIN_DEFAULT_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Chunk sizes of the chunked implementation (None: the backend's measured default).

    A chunk larger than the sequence is clipped to it; sequences need not divide the chunk.
    Defaults: 2048 × 2048 on GPU, 512 × 512 on CPU, halved (down to 128) while a score block
    of B·N·tq·tk float32 elements would exceed 2^28 (GPU) or 2^24 (CPU) elements.
    """

    q_chunk_size: int | None = None
    kv_chunk_size: int | None = None

    def __post_init__(self):
        for name in ("q_chunk_size", "kv_chunk_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ChunkConfig.{name} must be a positive int or None, got {v!r}")

    def resolve(
        self, seq_q: int, seq_k: int, batch_heads: int = 1, backend: str | None = None
    ) -> tuple[int, int]:
        """Concrete (tq, tk) for these lengths and B·N on `backend` (default: jax's default)."""
        backend = backend or jax.default_backend()
        tq, tk = _DEFAULT_CHUNKS.get(backend, _FALLBACK_CHUNKS)
        tq, tk = min(tq, seq_q), min(tk, seq_k)
        budget = _BLOCK_ELEMENT_BUDGET.get(backend, 2**24)
        while batch_heads * tq * tk > budget and max(tq, tk) > _MIN_DEFAULT_CHUNK:
            if tq >= tk:
                tq = max(tq // 2, _MIN_DEFAULT_CHUNK)
            else:
                tk = max(tk // 2, _MIN_DEFAULT_CHUNK)
        tq = self.q_chunk_size or tq
        tk = self.kv_chunk_size or tk
        return max(1, min(tq, seq_q)), max(1, min(tk, seq_k))


class Static(NamedTuple):
    """Everything static about one call (hashable: a `nondiff_argnums` entry)."""

    spec: masks.MaskSpec
    scale: float
    soft_cap: float | None
    score_fn: Callable[..., Array] | None  # (s, b, h, q_pos, k_pos, *score_params) -> s
    dropout_rate: float
    broadcast_dropout: bool
    tq: int
    tk: int
    seq_k: int  # true key length; keys at or past it are padding
    precision: Any


class _Block(NamedTuple):
    """Where a block sits: its query/key starts and the padded key length."""

    q_start: Array
    k_start: Array
    padded_seq_k: int


def _index_grids(batch: int, num_heads: int, blk: _Block, tq: int, tk: int, marr: masks.MaskArrays):
    """int32 (batch, head, global query row, query position, key position), broadcastable to
    a block (global: offset by the block's `q_base` / `k_base`, see masks.py)."""
    q_base, k_base = masks.bases(marr)
    b_idx = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]  # (B, 1, 1, 1)
    h_idx = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None]  # (1, N, 1, 1)
    rows = (q_base + blk.q_start + jnp.arange(tq, dtype=jnp.int32))[None, None, :, None]
    qpos = rows + marr.q_offset[:, None, None, None]  # (B, 1, tq, 1)
    kpos = (k_base + blk.k_start + jnp.arange(tk, dtype=jnp.int32))[None, None, None, :]
    return b_idx, h_idx, rows, qpos, kpos


def _block_scores(
    st: Static,
    qg: Array,
    k_t: Array,
    bias: Array | None,
    score_params: tuple[Array, ...],
    marr: masks.MaskArrays,
    blk: _Block,
    full: bool = False,
) -> tuple[Array, Array, Array]:
    """Scores of one block in the documented order: scale·q·kᵀ → cap → + bias → score_fn → mask.

    `qg` is the query block in the grouped layout [B, K, G·tq, H] (summary.grouped_heads),
    `k_t` the key block as [B, K, H, tk] (summary.keys_transposed).

    Returns (raw, biased, masked), all float32 [B, N, tq, tk]: raw is scale·q·kᵀ, biased is the
    input of score_fn, masked the final scores with −inf where a key may not be attended.
    A `full` block (classified from the mask's index structure) skips the mask arithmetic.
    """
    batch, num_kv_heads, rows, _ = qg.shape
    tq, tk = st.tq, k_t.shape[3]
    num_heads = num_kv_heads * rows // tq
    adt = accum_dtype(qg.dtype)
    raw = scores_grouped(qg, k_t, precision=st.precision).reshape(batch, num_heads, tq, tk)
    raw = raw * st.scale
    s = raw
    if st.soft_cap is not None:
        s = st.soft_cap * jnp.tanh(s / st.soft_cap)
    if bias is not None:
        s = s + masks.slice_block(bias, blk.q_start, blk.k_start, tq, tk).astype(adt)
    biased = s
    if st.score_fn is not None:
        b_idx, h_idx, _, qpos, kpos = _index_grids(batch, num_heads, blk, tq, tk, marr)
        s = jnp.broadcast_to(st.score_fn(s, b_idx, h_idx, qpos, kpos, *score_params), s.shape)
        s = s.astype(adt)
    if full:
        return raw, biased, s
    allowed = masks.block_mask(
        st.spec,
        marr,
        q_start=blk.q_start,
        k_start=blk.k_start,
        tq=tq,
        tk=tk,
        num_heads=num_heads,
        seq_k=st.seq_k,
        padded_seq_k=blk.padded_seq_k,
    )
    masked = s if allowed is None else jnp.where(allowed, s, -jnp.inf)
    return raw, biased, masked


def _dropout_keep(
    st: Static, seed: Array, marr: masks.MaskArrays, blk: _Block, batch, num_heads, tq, tk
):
    b_idx, h_idx, rows, _, kpos = _index_grids(batch, num_heads, blk, tq, tk, marr)
    return masks.dropout_keep(seed, b_idx, h_idx, rows, kpos, st.dropout_rate, st.broadcast_dropout)


def _masked_then_full(
    lo: Array,
    hi: Array,
    full_range: tuple[Array, Array] | None,
    body: Callable[[Array, bool, Any], Any],
    init: Any,
) -> Any:
    """Run body(j, full, carry) for j in [lo, hi): full=True on `full_range`, False elsewhere.

    Two loops, so the mask arithmetic is compiled only into the loop over partial blocks.
    """
    if full_range is None:
        return jax.lax.fori_loop(lo, hi, lambda j, c: body(j, False, c), init)
    flo, fhi = full_range
    n_before = flo - lo

    def partial(t, c):
        return body(jnp.where(t < n_before, lo + t, fhi + t - n_before), False, c)

    carry = jax.lax.fori_loop(jnp.int32(0), n_before + (hi - fhi), partial, init)
    return jax.lax.fori_loop(flo, fhi, lambda j, c: body(j, True, c), carry)


def _check_block(st: Static, q: Array, k: Array) -> None:
    """The block contract takes inputs padded to whole chunks: refuse any other shape."""
    if q.shape[1] % st.tq or k.shape[1] % st.tk or not 0 < st.seq_k <= k.shape[1]:
        raise ValueError(
            f"block inputs must be padded to whole chunks (tq={st.tq}, tk={st.tk}) with "
            f"0 < seq_k={st.seq_k} <= S; got q.shape={q.shape}, k.shape={k.shape}"
        )


def block_forward(
    st: Static,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    score_params: tuple[Array, ...],
    marr: masks.MaskArrays,
    seed: Array | None,
    sinks: Array | None = None,
) -> tuple[Array, Array]:
    """The public block contract, forward: (out [B, Tp, N, Hv] in the input dtype, lse f32
    [B, N, Tp]) of one query block against one key block, inputs padded to whole chunks.

    The block sits in a larger problem at `marr.q_base` / `marr.k_base` (global index of its
    first query row / key; None: 0): causal, window, q_offset, lengths, mask_fn, score_fn and
    dropout are evaluated at global positions, so attention split into blocks (ring
    attention) merges to exactly the single-device result (`summary.merge` on (out, lse)).
    `sinks` [N]: each row's loop starts from its head's sink summary (`sink_summary`); pass
    them to one block per row only. No gradient rule: `attention` is the differentiable form,
    `block_backward` the backward from a merged (out, lse).
    """
    _check_block(st, q, k)
    batch, seq_q, num_heads, _ = q.shape
    seq_k, head_dim_v = k.shape[1], v.shape[-1]
    tq, tk = st.tq, st.tk
    nq, nk = seq_q // tq, seq_k // tk
    keep_scale = 1.0 / (1.0 - st.dropout_rate) if st.dropout_rate > 0 else 1.0
    index_only = masks.index_only(st.spec, marr)
    adt = accum_dtype(q.dtype)

    def q_step(i, carry):
        out, lse = carry
        q_start = i * tq
        qc = jax.lax.dynamic_slice_in_dim(q, q_start, tq, axis=1)  # (B, tq, N, H)
        qg = grouped_heads(qc, k.shape[2])  # (B, K, G·tq, H), once per query block
        lo, hi = masks.kv_chunk_range(st.spec, marr, q_start, tq, tk, nk)
        full = None
        if index_only:
            full = masks.kv_full_range(st.spec, marr, q_start, tq, tk, lo, hi, seq_k != st.seq_k)

        def kv_step(j, is_full: bool, acc: ChunkSummary) -> ChunkSummary:
            k_start = j * tk
            blk = _Block(q_start, k_start, seq_k)
            kc = jax.lax.dynamic_slice_in_dim(k, k_start, tk, axis=1)  # (B, tk, K, H)
            vc = jax.lax.dynamic_slice_in_dim(v, k_start, tk, axis=1)  # (B, tk, K, Hv)
            k_t = keys_transposed(kc)  # (B, K, H, tk)
            _, _, s = _block_scores(st, qg, k_t, bias, score_params, marr, blk, is_full)
            keep = None
            if st.dropout_rate > 0:
                keep = _dropout_keep(st, seed, marr, blk, batch, num_heads, tq, tk)
            part = summarize_scores(s, vc, keep=keep, keep_scale=keep_scale, precision=st.precision)
            return merge(acc, part)

        init = row_start(sinks, batch, num_heads, tq, head_dim_v, adt)
        acc = _masked_then_full(lo, hi, full, kv_step, init)
        out = jax.lax.dynamic_update_slice_in_dim(out, acc.output(out.dtype), q_start, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, acc.lse(), q_start, axis=2)
        return out, lse

    out = jnp.zeros((batch, seq_q, num_heads, head_dim_v), v.dtype)
    lse = jnp.full((batch, num_heads, seq_q), -jnp.inf, adt)
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(nq), q_step, (out, lse))


def block_backward(
    st: Static,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    score_params: tuple[Array, ...],
    marr: masks.MaskArrays,
    seed: Array | None,
    out: Array,
    lse: Array,
    dout: Array,
    dlse: Array,
) -> tuple[Array, Array, Array, Array | None, tuple[Array, ...]]:
    """The public block contract, backward: dq, dk, dv, dbias, dscore_params of one block.

    `out` and `lse` are the whole problem's for these query rows (merged over every key block,
    sinks included), so P = exp(s − lse) is each key's final weight; the gradients of all key
    blocks add up to the single-device gradient (FA-2 backward, module docstring).
    """
    _check_block(st, q, k)
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    groups = num_heads // num_kv_heads
    tq, tk = st.tq, st.tk
    nq, nk = seq_q // tq, seq_k // tk
    keep_scale = 1.0 / (1.0 - st.dropout_rate) if st.dropout_rate > 0 else 1.0
    adt = accum_dtype(q.dtype)

    # D = rowsum(dO ∘ O) (B, N, Tp); dlse enters dS with the opposite sign, so fold it in.
    delta = output_delta(out, dout, dlse)  # (B, N, Tp)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # masked rows: s = −inf gives P = 0

    def kv_step(j, carry):
        dq, dk, dv, dbias, dparams = carry
        k_start = j * tk
        kc = jax.lax.dynamic_slice_in_dim(k, k_start, tk, axis=1)  # (B, tk, K, H)
        vc = jax.lax.dynamic_slice_in_dim(v, k_start, tk, axis=1)  # (B, tk, K, Hv)
        # Laid out once per key block for every query block's products (summary.grouped_heads).
        k_t, k_h, v_t = keys_transposed(kc), kv_heads_major(kc), keys_transposed(vc)
        lo, hi = masks.q_chunk_range(st.spec, marr, k_start, tq, tk, nq)
        full = None
        if masks.index_only(st.spec, marr):
            full = masks.q_full_range(
                st.spec, marr, k_start, tq, tk, lo, hi, k_start + tk > st.seq_k
            )

        def q_step(i, is_full: bool, c):
            dq, dkc, dvc, dbias, dparams = c
            q_start = i * tq
            blk = _Block(q_start, k_start, seq_k)
            qc = jax.lax.dynamic_slice_in_dim(q, q_start, tq, axis=1)  # (B, tq, N, H)
            doc = jax.lax.dynamic_slice_in_dim(dout, q_start, tq, axis=1)  # (B, tq, N, Hv)
            lse_c = jax.lax.dynamic_slice_in_dim(lse_safe, q_start, tq, axis=2)  # (B, N, tq)
            delta_c = jax.lax.dynamic_slice_in_dim(delta, q_start, tq, axis=2)  # (B, N, tq)
            qg = grouped_heads(qc, num_kv_heads)  # (B, K, G·tq, H)
            raw, biased, s = _block_scores(st, qg, k_t, bias, score_params, marr, blk, is_full)
            p = jnp.exp(s - lse_c[..., None])  # (B, N, tq, tk); 0 where masked
            p_drop = p
            if st.dropout_rate > 0:
                keep = _dropout_keep(st, seed, marr, blk, batch, num_heads, tq, tk)
                p_drop = jnp.where(keep, p * keep_scale, 0.0)
            # The products in the grouped layout (summary.grouped_heads): [B, K, G·tq, ·].
            pg = p_drop.astype(v.dtype).reshape(batch, num_kv_heads, groups * tq, tk)
            dog = grouped_heads(doc, num_kv_heads)  # (B, K, G·tq, Hv)
            # dVᵀ += dOᵀ·P: (B, K, G·tq, Hv) x (B, K, G·tq, tk) -> (B, K, Hv, tk)
            dvc = dvc + transposed_times(dog, pg, precision=st.precision)
            # dP = dO·Vᵀ: (B, K, G·tq, Hv) x (B, K, Hv, tk) -> (B, N, tq, tk)
            dp = scores_grouped(dog, v_t, precision=st.precision).reshape(p.shape)
            if st.dropout_rate > 0:
                dp = jnp.where(keep, dp * keep_scale, 0.0)
            ds = p * (dp - delta_c[..., None])  # d(loss)/d(final scores)
            if st.score_fn is not None:  # chain rule through the user's elementwise score_fn
                b_idx, h_idx, _, qpos, kpos = _index_grids(batch, num_heads, blk, tq, tk, marr)
                _, score_vjp = jax.vjp(
                    lambda x, params: jnp.broadcast_to(
                        st.score_fn(x, b_idx, h_idx, qpos, kpos, *params), x.shape
                    ).astype(adt),
                    biased,
                    score_params,
                )
                ds, dp_block = score_vjp(ds)
                dparams = jax.tree_util.tree_map(lambda a, g: a + g.astype(adt), dparams, dp_block)
            if dbias is not None:
                dbias = masks.add_block(dbias, ds, q_start, k_start)
            if st.soft_cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh²
                ds = ds * (1.0 - jnp.square(jnp.tanh(raw / st.soft_cap)))
            dsg = (ds * st.scale).astype(q.dtype).reshape(batch, num_kv_heads, groups * tq, tk)
            # dQ += dS·K: (B, K, G·tq, tk) x (B, K, tk, H) -> (B, tq, N, H)
            dqc = ungrouped_heads(weights_times_values(dsg, k_h, precision=st.precision), tq)
            old = jax.lax.dynamic_slice_in_dim(dq, q_start, tq, axis=1)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, old + dqc, q_start, axis=1)
            # dKᵀ += Qᵀ·dS: (B, K, G·tq, H) x (B, K, G·tq, tk) -> (B, K, H, tk)
            dkc = dkc + transposed_times(qg, dsg, precision=st.precision)
            return dq, dkc, dvc, dbias, dparams

        dkc = jnp.zeros((batch, num_kv_heads, head_dim, tk), adt)  # dKᵀ, dVᵀ: see q_step
        dvc = jnp.zeros((batch, num_kv_heads, head_dim_v, tk), adt)
        dq, dkc, dvc, dbias, dparams = _masked_then_full(
            lo, hi, full, q_step, (dq, dkc, dvc, dbias, dparams)
        )
        dkc = jnp.transpose(dkc, (0, 3, 1, 2))  # (B, tk, K, H)
        dvc = jnp.transpose(dvc, (0, 3, 1, 2))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dkc.astype(dk.dtype), k_start, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dvc.astype(dv.dtype), k_start, axis=1)
        return dq, dk, dv, dbias, dparams

    dq = jnp.zeros(q.shape, adt)
    dk = jnp.zeros(k.shape, k.dtype)
    dv = jnp.zeros(v.shape, v.dtype)
    dbias = None if bias is None else jnp.zeros(bias.shape, adt)
    dparams = tuple(jnp.zeros(p.shape, adt) for p in score_params)
    dq, dk, dv, dbias, dparams = jax.lax.fori_loop(
        jnp.int32(0), jnp.int32(nk), kv_step, (dq, dk, dv, dbias, dparams)
    )
    dbias = None if bias is None else dbias.astype(bias.dtype)
    dparams = tuple(g.astype(p.dtype) for g, p in zip(dparams, score_params, strict=True))
    return dq.astype(q.dtype), dk, dv, dbias, dparams


def sink_gradient(sinks: Array, out: Array, lse: Array, dout: Array, dlse: Array) -> Array:
    """d loss / d sinks from the residuals: −Σ_{b,i} P_sink·D_i, P_sink = exp(sink − lse).

    out/dout [B, T, N, Hv], lse/dlse [B, N, T] (lse includes the sinks; a row whose lse is
    not finite, or a residual standing for "no key", contributes nothing); D = rowsum(dO ∘ O)
    − dlse, as in the backward of the keys.
    """
    adt = accum_dtype(out.dtype)
    delta = output_delta(out, dout, dlse)
    p_sink = jnp.exp(sinks.astype(adt)[None, :, None] - lse.astype(adt))
    p_sink = jnp.where(jnp.isfinite(p_sink), p_sink, 0.0)
    return (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(
    st: Static,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    score_params: tuple[Array, ...],
    marr: masks.MaskArrays,
    seed: Array | None,
    sinks: Array | None = None,
) -> tuple[Array, Array]:
    """Chunked attention on padded 4-D inputs: (out [B, Tp, N, Hv], lse f32 [B, N, Tp]).

    `score_params` are the float arrays `st.score_fn` closes over, made explicit
    (`jax.closure_convert`) so that they get gradients too. `sinks` [N] (or None) join every
    row's denominator; their gradient is `sink_gradient`.
    """
    return block_forward(st, q, k, v, bias, score_params, marr, seed, sinks)


def _attention_fwd(st, q, k, v, bias, score_params, marr, seed, sinks):
    out, lse = block_forward(st, q, k, v, bias, score_params, marr, seed, sinks)
    # Residuals are outputs of the forward program: keep them finite (a row that sees no key,
    # padding rows included, has s = −inf on every key, so any finite lse gives P = 0).
    lse_res = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (out, lse), (q, k, v, bias, score_params, marr, seed, out, lse_res, sinks)


def _attention_bwd(st, res, cotangents):
    *res, sinks = res
    q, k, v, bias, score_params, marr, seed, out, lse = res
    dout, dlse = cotangents
    dq, dk, dv, dbias, dparams = _first_order_backward(st, tuple(res), dout, dlse)
    dsinks = None if sinks is None else sink_gradient(sinks, out, lse, dout, dlse)
    no_grad = jax.tree_util.tree_map(lambda _: None, (marr, seed))
    return (dq, dk, dv, dbias, dparams, *no_grad, dsinks)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_backward(st: Static, res: tuple, dout: Array, dlse: Array):
    """The backward pass; differentiating it again (grad of grad) raises a clear error.

    Its loops have data-dependent bounds (only the blocks a mask lets through), which JAX
    cannot reverse-differentiate; without this guard the user would see a while_loop error.
    """
    q, k, v, bias, score_params, marr, seed, out, lse = res
    return block_backward(st, q, k, v, bias, score_params, marr, seed, out, lse, dout, dlse)


@_first_order_backward.defjvp
def _no_second_order(st, primals, tangents):
    del st, primals, tangents
    raise NotImplementedError(
        "second-order derivatives (grad of grad, Hessians) are not implemented by the chunked "
        "attention; use implementation='xla' for them"
    )


attention.defvjp(_attention_fwd, _attention_bwd)
