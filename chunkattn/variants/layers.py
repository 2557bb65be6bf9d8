"""Flax nnx layers for the linear-time variants: x [B, T, D] -> [B, T, D], causal.

Constructor signature `(dim, num_heads, num_kv_heads=None, *, dtype, rngs, **ignored)` so the GPT
block can build them in place of `MultiHeadAttention`; they have no KV cache (`cache` must be None).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from chunkattn.variants.caterpillar import caterpillar
from chunkattn.variants.delta import delta_rule
from chunkattn.variants.linear import dpfp, linear_attention


class _Base(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)

    def _split(self, x: jax.Array):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # 3 × (B, T, D)
        return tuple(y.reshape(b, t, self.num_heads, self.head_dim) for y in (q, k, v))

    def _out(self, y: jax.Array) -> jax.Array:
        b, t = y.shape[:2]
        return self.wo(y.reshape(b, t, -1))  # (B, T, N·H) -> (B, T, D)

    @staticmethod
    def _no_cache(cache):
        if cache is not None:
            raise NotImplementedError("variant attention layers have no KV cache (decoding)")


class LinearAttention(_Base):
    """Causal linear attention with elu+1 features, normalized.

    Example:
      >>> layer = LinearAttention(64, 4, rngs=nnx.Rngs(0)); y = layer(x)  # x (B, T, 64)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        chunk_size: int = 64,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_: Any,
    ):
        super().__init__(dim, num_heads, dtype=dtype, rngs=rngs)
        self.chunk_size = chunk_size

    def __call__(self, x: jax.Array, cache: Any = None) -> jax.Array:
        self._no_cache(cache)
        q, k, v = self._split(x)
        return self._out(linear_attention(q, k, v, chunk_size=self.chunk_size))


class FastWeightAttention(_Base):
    """Delta-rule fast weights with DPFP(ν) features and a learned β = sigmoid(x W_β).

    Example:
      >>> layer = FastWeightAttention(64, 4, rngs=nnx.Rngs(0)); y = layer(x)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        nu: int = 1,
        chunk_size: int = 64,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_: Any,
    ):
        if nu < 1:
            raise ValueError(f"FastWeightAttention: nu (DPFP ν) must be >= 1, got {nu}")
        super().__init__(dim, num_heads, dtype=dtype, rngs=rngs)
        self.nu, self.chunk_size = nu, chunk_size
        self.beta = nnx.Linear(dim, num_heads, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Any = None) -> jax.Array:
        self._no_cache(cache)
        q, k, v = self._split(x)
        beta = jax.nn.sigmoid(self.beta(x).astype(jnp.float32))  # (B, T, N)
        fq, fk = dpfp(q, self.nu), dpfp(k, self.nu)  # (B, T, N, 2·H·ν)
        return self._out(delta_rule(fq, fk, v, beta, chunk_size=self.chunk_size))


class CaterpillarAttention(_Base):
    """Caterpillar: gates sigmoid(x W_g + b) clipped G ← G / max(1, Σ_h G), learned initial states.

    Example:
      >>> layer = CaterpillarAttention(64, 4, height=4, length=16, rngs=nnx.Rngs(0)); y = layer(x)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        height: int = 4,
        length: int = 16,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_: Any,
    ):
        if height < 1 or length < 1:
            raise ValueError(
                f"CaterpillarAttention: height (CH) and length (CL) must be >= 1, got "
                f"height={height}, length={length}"
            )
        super().__init__(dim, num_heads, dtype=dtype, rngs=rngs)
        self.height, self.length = height, length
        self.gate = nnx.Linear(
            dim,
            num_heads * height,
            dtype=dtype,
            rngs=rngs,
            bias_init=nnx.initializers.constant(-5.0),
        )
        h = self.head_dim
        self.init_k = nnx.Param(0.02 * jax.random.normal(rngs.params(), (height, length, h)))
        self.init_v = nnx.Param(0.02 * jax.random.normal(rngs.params(), (height, length, h)))

    def __call__(self, x: jax.Array, cache: Any = None) -> jax.Array:
        self._no_cache(cache)
        b, t, _ = x.shape
        q, k, v = self._split(x)
        g = jax.nn.sigmoid(self.gate(x).astype(jnp.float32))
        g = g.reshape(b, t, self.num_heads, self.height)  # (B, T, N, CH)
        g = g / jnp.maximum(1.0, jnp.sum(g, axis=2, keepdims=True))
        y = caterpillar(
            q, k, v, g, length=self.length, init_k=self.init_k[...], init_v=self.init_v[...]
        )
        return self._out(y)


LAYERS = {
    "linear": LinearAttention,
    "delta": FastWeightAttention,
    "caterpillar": CaterpillarAttention,
}
