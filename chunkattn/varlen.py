"""`varlen_attention`: attention over packed variable-length sequences (FlashAttention varlen).

Sequences are packed end to end along one token axis: q [total_q, N, H], k [total_k, K, H],
v [total_k, K, Hv], with int32 cumulative offsets `cu_seqlens_q` / `cu_seqlens_k`
[num_seqs + 1] (0 first; sequence i holds tokens cu[i] … cu[i+1] − 1). Query sequence i attends
to key sequence i only.

This module owns the translation to `dot_product_attention`: the offsets become per-token
segment ids (tokens past cu[-1] are padding: ids that match nothing, so their rows give 0), the
packed arrays a batch of one. The chunked core then skips every (query chunk, key chunk) pair
whose segment id ranges do not meet (`masks.kv_chunk_range`), so many short sequences cost
≈ Σ Tᵢ², not (Σ Tᵢ)².

Causal and window masks compare packed positions, which equals the per-sequence (top-left
aligned) mask exactly when cu_seqlens_q == cu_seqlens_k (self-attention packing). Other layouts
with causal or a window are refused (NotImplementedError) when the offsets are concrete; under
tracing, where they cannot be checked before running, the output is NaN instead of a silently
wrong number. Traced offsets that are not valid (cu[0] ≠ 0, decreasing, past the end) give NaN
in the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn.api import dot_product_attention
from chunkattn.arguments import is_concrete
from chunkattn.chunked import ChunkConfig

Array = jax.Array

# Filled in from the offsets; a caller's own value would contradict them.
_SET_HERE = ("segment_ids", "query_seq_lengths", "key_value_seq_lengths")
# Padding tokens (past cu[-1]) get ids below every sequence's, different for queries and keys.
_PAD_Q, _PAD_K = -1, -2
# Smallest chunk chosen for short sequences: below it the loop overhead outgrows the savings.
_MIN_CHUNK = 128


def _max_seqlen(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 1:
        raise ValueError(f"{name} must be a positive int (static), got {x!r}")
    return int(x)


def _cu_seqlens(
    name: str, cu: Any, total: int, max_seqlen: int, max_name: str
) -> np.ndarray | Array:
    """The offsets as int32 [num_seqs + 1]: checked numpy when concrete, else a clipped array."""
    dtype = cu.dtype if hasattr(cu, "dtype") else np.asarray(cu).dtype
    shape = tuple(np.shape(cu))
    if not jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
        raise ValueError(f"{name} must be int32 [num_seqs + 1], got dtype {dtype}")
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(
            f"{name} must be int32 [num_seqs + 1] (at least [0]), got {name}.shape={shape}"
        )
    if is_concrete(cu):
        values = np.asarray(cu).astype(np.int64)  # a numpy array: concrete under any trace
        lengths = np.diff(values)
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {name}[0]={values[0]}")
        if (lengths < 0).any():
            i = int(np.argmax(lengths < 0))
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}]={values[i]} > "
                f"{name}[{i + 1}]={values[i + 1]}"
            )
        if values[-1] > total:
            raise ValueError(
                f"{name}[-1]={values[-1]} is past the {total} packed tokens it indexes"
            )
        if lengths.size and lengths.max() > max_seqlen:
            i = int(np.argmax(lengths))
            raise ValueError(
                f"sequence {i} has {lengths[i]} tokens ({name}[{i + 1}] − {name}[{i}]), more than "
                f"{max_name}={max_seqlen}"
            )
        return values.astype(np.int32)
    return jnp.clip(jnp.asarray(cu), 0, np.iinfo(np.int32).max).astype(jnp.int32)


def _valid_traced(cu: Array, total: int) -> Array:
    """bool scalar: offsets that start at 0, never decrease and end within the tokens."""
    return (cu[0] == 0) & jnp.all(cu[1:] >= cu[:-1]) & (cu[-1] <= total)


def _segment_ids(cu_seqlens: Array, total: int, pad_id: int = _PAD_Q) -> Array:
    """int32 [total]: each packed token's sequence, as a segment id; `pad_id` past cu[-1].

    Ids count down (sequence i of n gets n − 1 − i) and the (negative) padding ids continue the
    descent, so ids never increase along the tokens: every chunk's [min, max] stays tight for
    the block skipping, the chunk that holds the last sequence and the padding included
    (ascending ids followed by −1 would stretch that chunk's span over every sequence).
    """
    num_seqs = cu_seqlens.shape[0] - 1
    tokens = jnp.arange(total, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens, tokens, side="right").astype(jnp.int32) - 1  # (total,)
    inside = (seq >= 0) & (seq < num_seqs)  # empty sequences are skipped by side="right"
    return jnp.where(inside, num_seqs - 1 - seq, jnp.int32(pad_id))


def _chunks_for_sequences(options: dict, total_q: int, total_k: int, heads: int, num_seqs: int):
    """options with chunks sized to the sequences, where the chunked path runs with defaults.

    A block is computed whole once any of its pairs meets, so chunks much longer than the
    sequences compute mostly masked pairs: chunks of half the mean sequence length, a power of
    two from 128 up to the backend's default, ran 64 causal documents in 16k tokens 2.1× as
    fast forward and backward (2.8× forward) as the 512 default on CPU
    (bench/results/varlen_cpu_2026-12-01.csv). A caller's `config` wins; off GPU
    `implementation=None` is the chunked path (on GPU the Pallas kernels, with their own config).
    """
    impl = options.get("implementation")
    chunked = impl == "chunked" or (impl is None and jax.default_backend() != "gpu")
    if options.get("config") is not None or not chunked or num_seqs == 0:
        return options
    default = ChunkConfig().resolve(max(total_q, 1), max(total_k, 1), heads)
    sizes = []
    for total, limit in zip((total_q, total_k), default, strict=True):
        half_mean = max(1, total // num_seqs // 2)
        sizes.append(min(limit, max(_MIN_CHUNK, 1 << (half_mean.bit_length() - 1))))
    return dict(options, config=ChunkConfig(*sizes))


def varlen_attention(
    q: Array,
    k: Array,
    v: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    *,
    max_seqlen_q: int,
    max_seqlen_k: int,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """Attention over packed variable-length sequences, as FlashAttention's varlen API.

    Shapes: N query heads, K kv heads (K divides N), H head dim, Hv value head dim.

    Args:
      q: [total_q, N, H] query tokens of every sequence, packed end to end.
      k: [total_k, K, H], v: [total_k, K, Hv] the key/value tokens, packed the same way.
      cu_seqlens_q, cu_seqlens_k: int32 [num_seqs + 1] cumulative offsets, 0 first: sequence i
        is tokens cu[i] … cu[i+1] − 1. Equal num_seqs on both sides; empty sequences are
        allowed. Tokens at or past cu[-1] are padding: their rows give 0 (lse −inf) and no
        query sees them.
      max_seqlen_q, max_seqlen_k: the longest sequence on each side (positive static ints, as in
        FlashAttention); concrete offsets are checked against them.
      **options: any other option of `dot_product_attention` (is_causal, local_window_size,
        q_offset as one int, logits_soft_cap, scale, dropout_rate / dropout_rng, sinks,
        return_lse, precision, implementation, config, bias/mask/mask_fn/score_fn over packed
        positions). Without a `config`, the chunked path gets chunks sized to the sequences
        (half their mean length, 128 up to the default). Causal and window masks are per
        sequence (top-left aligned) and need
        cu_seqlens_q == cu_seqlens_k. Dropout, mask_fn and score_fn see packed positions
        (batch index 0), so dropout matches `dot_product_attention` on the same packed arrays.

    Returns:
      [total_q, N, Hv] in the input dtype, or (out, lse) with return_lse (lse float32
      [N, total_q]). Under tracing, offsets that fail the checks above give NaN.

    Raises:
      ValueError: a malformed argument (named, with its shape or value).
      NotImplementedError: causal/window with concrete cu_seqlens_q != cu_seqlens_k, or what
        the chosen implementation cannot serve.

    Example:
        >>> cu = jnp.array([0, 3, 10, 16], jnp.int32)  # three sequences, 16 tokens
        >>> q = k = v = jnp.ones((16, 8, 64), jnp.bfloat16)
        >>> out = chunkattn.varlen_attention(q, k, v, cu, cu, max_seqlen_q=7, max_seqlen_k=7,
        ...                                  is_causal=True)
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 3:
            want = "[total_q, N, H]" if name == "q" else "[total_k, K, H or Hv]"
            raise ValueError(f"{name} must be packed {want}, got {name}.shape={np.shape(x)}")
    for name in _SET_HERE:
        if name in options:
            raise ValueError(f"varlen_attention sets {name} from cu_seqlens; do not pass {name}")
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
    total_q, total_k = np.shape(q)[0], np.shape(k)[0]
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_q, "max_seqlen_q")
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_k, "max_seqlen_k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must have the same number of sequences, got "
            f"cu_seqlens_q.shape={cu_q.shape}, cu_seqlens_k.shape={cu_k.shape}"
        )

    ok = jnp.bool_(True)  # stays True unless a traced condition can fail
    concrete = is_concrete(cu_seqlens_q) and is_concrete(cu_seqlens_k)
    if not is_concrete(cu_seqlens_q):
        ok = ok & _valid_traced(cu_q, total_q)
    if not is_concrete(cu_seqlens_k):
        ok = ok & _valid_traced(cu_k, total_k)
    if options.get("is_causal") or options.get("local_window_size") is not None:
        if concrete:
            if not np.array_equal(cu_q, cu_k):
                raise NotImplementedError(
                    "varlen_attention does not implement causal/window with "
                    "cu_seqlens_q != cu_seqlens_k (masks compare packed positions)"
                )
        else:
            ok = ok & jnp.all(cu_q == cu_k)

    seg_q = _segment_ids(jnp.asarray(cu_q), total_q, _PAD_Q)
    seg_k = _segment_ids(jnp.asarray(cu_k), total_k, _PAD_K)
    num_seqs = cu_q.shape[0] - 1
    options = _chunks_for_sequences(options, total_q, total_k, np.shape(q)[1], num_seqs)
    result = dot_product_attention(q, k, v, segment_ids=(seg_q, seg_k), **options)
    if concrete:
        return result
    # Multiplying (not selecting) makes the gradients NaN as well.
    poison = jnp.where(ok, 1.0, jnp.nan)
    return jax.tree_util.tree_map(lambda x: x * poison.astype(x.dtype), result)
