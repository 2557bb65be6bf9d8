"""An nnx multi-head attention layer on chunkattn: grouped-query heads, rotary positions, masks
computed per chunk, optional attention sinks, and a KV cache for decoding.

The cache is a value (`KVCache`), passed in and returned, so a decode step is a pure function
that jits once: `y, cache = layer(x, cache=cache)`. A call with a cache writes its keys and
values at `cache.length` (a multi-token prefill or a single token) and attends with
`q_offset = length` and `key_value_seq_lengths = length + T`, so only the filled part of the
cache is read: a decode step (T ≤ `DECODE_MAX_QUERIES`) by `chunkattn.decode.decode_attention`,
a prefill by `dot_product_attention`.

With `use_sinks=True` a layer owns a parameter `sinks` [N] (zeros at init): one logit per query
head that joins every row's softmax denominator and carries no value (gpt-oss), passed as `sinks=`
to every one of those calls, so the full pass, a prefill and the decode steps agree.

A write never corrupts the cache silently. A call whose tokens do not fit (`cache.length + T`
past the cache's `max_len`, or a negative length) raises ValueError when `cache.length` is
concrete. Under jit it is traced: run the step under `checkify.checkify(step,
errors=checkify.user_checks)` to get the same message as a checkify error; unchecked, such a
call leaves the cache's contents as they were and returns NaN outputs (the returned length
still advances, so every later step is NaN too).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from chunkattn.api import dot_product_attention
from chunkattn.decode import DecodeConfig, decode_attention, require

Array = jax.Array

# A cached call with at most this many new tokens (a decode step) goes through
# `decode_attention` (the cache split into chunks summarised in parallel; pure JAX, so it serves
# implementation None and "chunked"); longer ones (a prefill) through `dot_product_attention`.
DECODE_MAX_QUERIES = 16


def partitioned(*axes: str | None) -> dict[str, Any]:
    """Variable metadata that names the mesh axis of each parameter dimension (None: replicated).

    An annotation only (`eager_sharding=False`: building a layer needs no mesh); a trainer turns
    it into shardings with `nnx.get_named_sharding(state, mesh)` on a mesh that has those axes.
    The layers here name "tp" (tensor parallelism, Megatron-style): a projection into heads is
    column-parallel, `partitioned(None, "tp")`, and the one out of heads row-parallel,
    `partitioned("tp", None)`, so each device keeps whole heads and nothing is gathered.
    """
    return {"out_sharding": axes, "eager_sharding": False}


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, and how many there are.

    A layer call with T new tokens needs `0 ≤ length` and `length + T ≤ L` (see the module
    docstring for what happens otherwise). `length` may be any integer dtype (int64 under x64).
    """

    key: Array  # [B, L, K, H]
    value: Array  # [B, L, K, H]
    length: Array  # integer scalar: filled positions

    @classmethod
    def empty(
        cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: Any = jnp.float32
    ) -> KVCache:
        """A cache of `max_len` positions with nothing written yet (zeros, length 0)."""
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def rotary(x: Array, positions: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding (RoFormer) of x [B, T, N, H] at positions [T] or [B, T].

    Feature i rotates with feature i + H/2, so the head dim H must be even; an odd H raises
    ValueError. Computed in float32 (float64 for float64 inputs), returned in x's dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(
            f"rotary needs an even head dim (features rotate in pairs), got x.shape={x.shape}"
        )
    half = x.shape[-1] // 2
    f = jnp.promote_types(x.dtype, jnp.float32)  # float32, float64 for float64 inputs
    freqs = base ** (-jnp.arange(half, dtype=f) / half)  # (H/2,)
    angles = positions.astype(f)[..., None] * freqs  # (..., T, H/2)
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # (..., T, 1, H/2)
    x1, x2 = x[..., :half].astype(f), x[..., half:].astype(f)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _write_cache(cache: KVCache, k: Array, v: Array) -> tuple[KVCache, Array | None]:
    """Writes k, v [B, T, K, H] at `cache.length`; returns the new cache and, when the write
    could not be checked (a traced length), the traced verdict to poison the outputs with."""
    size, seq = cache.key.shape[1], k.shape[1]
    for name, buf, new in (("key", cache.key, k), ("value", cache.value, v)):
        if buf.shape != (new.shape[0], size, *new.shape[2:]):
            raise ValueError(
                f"cache.{name}.shape={buf.shape} must be [B, max_len, K, H] with the new "
                f"{name}s' B, K and H, which are [B, T, K, H]={new.shape}"
            )
    if seq > size:
        raise ValueError(
            f"x.shape[1]={seq} new tokens do not fit a cache of max_len={size} "
            f"(cache.key.shape={cache.key.shape})"
        )
    length = jnp.asarray(cache.length)
    if length.shape != () or not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(
            f"cache.length must be an integer scalar, got dtype {length.dtype} and "
            f"shape {length.shape}"
        )
    fits = (length >= 0) & (length <= size - seq)  # no `length + seq`: it could wrap
    checked = require(
        fits,
        f"cache.length={{length}} must lie in [0, {size - seq}] to write x.shape[1]={seq} new "
        f"tokens into a cache of max_len={size} (cache.key.shape={cache.key.shape})",
        length=length,
    )
    at = jnp.clip(length, 0, size - seq)  # where dynamic_update_slice writes anyway

    def write(buf: Array, new: Array) -> Array:
        new = new.astype(buf.dtype)
        if checked is None:  # unchecked: a write that does not fit keeps what was there
            new = jnp.where(fits, new, jax.lax.dynamic_slice_in_dim(buf, at, seq, 1))
        return jax.lax.dynamic_update_slice_in_dim(buf, new, at, 1)

    cache = KVCache(write(cache.key, k), write(cache.value, v), length + seq)
    return cache, (fits if checked is None else None)


def _attend(
    layer: Any,
    q: Array,
    k: Array,
    v: Array,
    cache: KVCache | None,
    segment_ids: Array | None,
    sinks: Array | None,
) -> tuple[Array, KVCache | None]:
    """Shared by both layers: RoPE, the cache update and the chunkattn call.

    q [B, T, N, H], k and v [B, T, K, H], sinks [N] or None; `layer` supplies rope, rope_base,
    is_causal, local_window_size, implementation, config and decode_config.
    """
    batch, seq = q.shape[:2]
    if cache is not None and not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
    start = jnp.zeros((), jnp.int32) if cache is None else jnp.asarray(cache.length)
    if layer.rope:
        positions = start + jnp.arange(seq, dtype=jnp.int32)
        q, k = rotary(q, positions, layer.rope_base), rotary(k, positions, layer.rope_base)
    mesh = getattr(layer, "mesh", None)
    if mesh is not None:  # context parallelism: the sequence is sharded over mesh axis "sp"
        if cache is not None or segment_ids is not None or layer.local_window_size is not None:
            raise NotImplementedError("a KV cache, segment_ids or a window with ring attention")
        from chunkattn.parallel import ring_attention

        out = ring_attention(
            q,
            k,
            v,
            mesh=mesh,
            axis_name="sp",
            is_causal=layer.is_causal,
            sinks=sinks,
            implementation=layer.implementation,  # per ring step: "chunked", "pallas", None
            config=layer.config,
            batch_axis="dp" if "dp" in mesh.shape else None,
            head_axis="tp" if "tp" in mesh.shape else None,
        )
        return out, None
    kwargs: dict[str, Any] = dict(
        is_causal=layer.is_causal,
        local_window_size=layer.local_window_size,
        implementation=layer.implementation,
        config=layer.config,
        sinks=sinks,
    )
    if cache is not None:
        if segment_ids is not None:
            raise NotImplementedError("segment_ids with a KV cache")
        cache, fits = _write_cache(cache, k, v)
        size = cache.key.shape[1]
        k, v = cache.key.astype(q.dtype), cache.value.astype(q.dtype)
        # int32 like the core's indices (also under x64); clipped, as the write was
        start = jnp.clip(start, 0, size - seq).astype(jnp.int32)
        filled = jnp.full((batch,), start + seq, jnp.int32)
        if layer.implementation in (None, "chunked") and seq <= DECODE_MAX_QUERIES:
            out = decode_attention(
                q,
                k,
                v,
                filled,
                is_causal=layer.is_causal,
                local_window_size=layer.local_window_size,
                config=layer.decode_config,
                sinks=sinks,
            )
        else:
            kwargs.update(q_offset=start, key_value_seq_lengths=filled)
            out = dot_product_attention(q, k, v, **kwargs)  # (B, T, N, H)
        if fits is not None:
            out = jnp.where(fits, out, jnp.nan)
        return out, cache
    elif segment_ids is not None:
        kwargs["segment_ids"] = segment_ids
    return dot_product_attention(q, k, v, **kwargs), cache  # (B, T, N, H)


class MultiHeadAttention(nnx.Module):
    """Causal (by default) multi-head attention with GQA, optional RoPE and a KV cache.

    Args:
      dim: model width D. num_heads: query heads N. num_kv_heads: K (divides N; default N).
      rope: rotary position embedding on queries and keys (needs an even head dim
        dim / num_heads; an odd one raises ValueError).
      is_causal, local_window_size: masks computed per chunk, never materialised.
      implementation, config: passed to `chunkattn.dot_product_attention` (the full pass and
        a prefill). decode_config: a `DecodeConfig` for the decode steps (≤ 16 new tokens with
        a cache, implementation None or "chunked"), which go through `decode_attention`.
      mesh: a `jax.sharding.Mesh` (Auto axes) with an axis "sp", optionally "dp" and "tp":
        attention runs as `chunkattn.parallel.ring_attention` with the sequence sharded over
        "sp", the batch over "dp" and the heads over "tp" (N and K must divide by its size).
      use_sinks: own a parameter `sinks` [num_heads] (zeros at init), one logit per query head
        that joins each row's softmax denominator and carries no value (gpt-oss).
      dtype: the computation dtype. param_dtype: the parameters' dtype (the projections and
        `sinks`), float32 by default as in Flax.

    The parameters carry sharding annotations (`partitioned`) for tensor parallelism over a
    mesh axis "tp": wq, wk, wv and sinks split their heads over it, wo its input rows. They are
    names only; `jax.device_put(state, nnx.get_named_sharding(state, mesh))` places them.

    A call with `cache=` writes T tokens at `cache.length`; tokens that do not fit raise
    ValueError (concrete length) or, under jit, a checkify error when the step runs under
    `checkify.checkify(step, errors=checkify.user_checks)`; unchecked they give NaN outputs and
    leave the cache's contents intact (module docstring).

    Example:
        >>> layer = MultiHeadAttention(512, 8, num_kv_heads=2, rope=True, rngs=nnx.Rngs(0))
        >>> y = layer(x)                                     # (B, T, D)
        >>> cache = KVCache.empty(B, 1024, 2, 64)
        >>> y, cache = layer(prompt, cache=cache)            # prefill
        >>> y, cache = layer(next_token, cache=cache)        # one step
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        rope: bool = True,
        rope_base: float = 10000.0,
        is_causal: bool = True,
        local_window_size: int | tuple[int, int] | None = None,
        implementation: str | None = None,
        config: Any = None,
        decode_config: DecodeConfig | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        mesh: Any = None,
        use_sinks: bool = False,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        self.mesh = mesh  # a Mesh with axis "sp" (optionally "dp", "tp"): ring attention
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"dim={dim} must divide by num_heads={num_heads}, which must divide by "
                f"num_kv_heads={num_kv_heads}"
            )
        if rope and (dim // num_heads) % 2:
            raise ValueError(
                f"rope=True needs an even head dim, got head_dim={dim // num_heads} "
                f"(dim={dim} / num_heads={num_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.rope, self.rope_base, self.is_causal = rope, rope_base, is_causal
        self.local_window_size, self.implementation, self.config = (
            local_window_size,
            implementation,
            config,
        )
        self.decode_config = decode_config
        hd = self.head_dim
        lin = lambda i, o, axes: nnx.Linear(
            i,
            o,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_metadata=partitioned(*axes),
            rngs=rngs,
        )
        heads, rows = (None, "tp"), ("tp", None)  # column-parallel in, row-parallel out
        self.wq, self.wk = lin(dim, num_heads * hd, heads), lin(dim, num_kv_heads * hd, heads)
        self.wv, self.wo = lin(dim, num_kv_heads * hd, heads), lin(num_heads * hd, dim, rows)
        # Used as stored, not cast to `dtype`: the core keeps softmax statistics in float32.
        self.sinks = (
            nnx.Param(jnp.zeros((num_heads,), param_dtype), **partitioned("tp"))
            if use_sinks
            else None
        )

    def __call__(
        self, x: Array, *, cache: KVCache | None = None, segment_ids: Array | None = None
    ) -> Array | tuple[Array, KVCache]:
        batch, seq, _ = x.shape
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim)  # (B, T, N, H)
        k = self.wk(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, K, H)
        v = self.wv(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, K, H)
        sinks = None if self.sinks is None else self.sinks[...]  # (N,)
        out, cache = _attend(self, q, k, v, cache, segment_ids, sinks)
        y = self.wo(out.reshape(batch, seq, self.num_heads * self.head_dim))
        return y if cache is None else (y, cache)


class LinenMultiHeadAttention(linen.Module):
    """The linen counterpart of `MultiHeadAttention` (same parameters' roles, same masks).

    Call as `y = layer(x)` or, decoding, `y, cache = layer(x, cache=cache)` with a `KVCache`.
    `use_sinks=True` adds the parameter "sinks" [num_heads] (zeros at init, `param_dtype`).
    """

    dim: int
    num_heads: int
    num_kv_heads: int | None = None
    rope: bool = True
    rope_base: float = 10000.0
    is_causal: bool = True
    local_window_size: int | tuple[int, int] | None = None
    implementation: str | None = None
    config: Any = None
    decode_config: DecodeConfig | None = None
    use_sinks: bool = False
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(
        self, x: Array, *, cache: KVCache | None = None, segment_ids: Array | None = None
    ) -> Array | tuple[Array, KVCache]:
        kv_heads = self.num_kv_heads or self.num_heads
        hd = self.dim // self.num_heads
        batch, seq, _ = x.shape
        dense = lambda n, name: linen.Dense(
            n, use_bias=False, param_dtype=self.param_dtype, name=name
        )
        q = dense(self.num_heads * hd, "wq")(x).reshape(batch, seq, self.num_heads, hd)
        k = dense(kv_heads * hd, "wk")(x).reshape(batch, seq, kv_heads, hd)  # (B, T, K, H)
        v = dense(kv_heads * hd, "wv")(x).reshape(batch, seq, kv_heads, hd)
        sinks = None
        if self.use_sinks:
            zeros = linen.initializers.zeros_init()
            sinks = self.param("sinks", zeros, (self.num_heads,), self.param_dtype)  # (N,)
        out, cache = _attend(self, q, k, v, cache, segment_ids, sinks)
        y = dense(self.dim, "wo")(out.reshape(batch, seq, self.num_heads * hd))
        return y if cache is None else (y, cache)
