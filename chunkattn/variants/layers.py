"""Flax nnx layers for the linear-time variants: x [B, T, D] -> [B, T, D], causal.

Constructor signature `(dim, num_heads, num_kv_heads=None, *, dtype, rngs, **ignored)` so the GPT
block can build them in place of `MultiHeadAttention`. Linear attention, the DPFP delta rule and
Caterpillar have no cache (`cache` must be None); `GatedDeltaNet` decodes with a
`GatedDeltaCache` (the recurrent state and the convolution's last inputs: O(1) per token).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from chunkattn.variants.caterpillar import caterpillar
from chunkattn.variants.delta import delta_rule, delta_rule_step
from chunkattn.variants.linear import dpfp, linear_attention

Array = jax.Array


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


class GatedDeltaCache(NamedTuple):
    """What `GatedDeltaNet` carries from one call to the next: its whole memory of the past.

    Its size does not grow with the sequence: a decoding step costs the same at any length.
    """

    state: Array  # [B, N, Hk, Hv] float32, the fast weights S = Wᵀ after the tokens seen
    conv: Array  # [B, W − 1, 3·D], the short convolution's last W − 1 inputs (q, k, v)
    length: Array  # integer scalar: tokens seen

    @classmethod
    def empty(
        cls, batch: int, num_heads: int, head_dim: int, conv_size: int, dtype: Any = jnp.float32
    ) -> GatedDeltaCache:
        """The cache before the first token: zero state, zero (causal padding) conv inputs."""
        dim = num_heads * head_dim
        return cls(
            jnp.zeros((batch, num_heads, head_dim, head_dim), jnp.float32),
            jnp.zeros((batch, conv_size - 1, 3 * dim), dtype),
            jnp.zeros((), jnp.int32),
        )


class GatedDeltaNet(nnx.Module):
    """The Gated DeltaNet token mixer (Yang, Kautz & Hatamizadeh, arXiv 2412.06464, §3.3).

    q, k, v = SiLU(causal depthwise conv_W(x W_q,k,v)) per head, q and k L2-normalised (q also
    scaled by 1/√H); β = sigmoid(x W_β); decay g = −exp(A_log) · softplus(x W_a + dt_bias) <= 0
    (Mamba-2's parameterisation: A ~ U(1, 16), softplus(dt_bias) ~ logU(0.001, 0.1)); the gated
    delta rule `delta_rule(q, k, v, β, log_decay=g)`; per head RMSNorm of the output times the
    gate SiLU(x W_gate), then W_o. Parameters 5·D² + (3·W + 2·N)·D + 3·N + H (the output gate
    is the fifth D²), against 4·D² for softmax attention.

    Call as `y = layer(x)` or, decoding, `y, cache = layer(x, cache=cache)` with a
    `GatedDeltaCache` from `empty_cache` (T = 1 is one `delta_rule_step`; a longer x is a
    chunked prefill from the cached state).

    Example:
      >>> layer = GatedDeltaNet(64, 4, rngs=nnx.Rngs(0)); y = layer(x)  # x (B, T, 64)
      >>> y, cache = layer(x, cache=layer.empty_cache(x.shape[0]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        conv_size: int = 4,
        chunk_size: int = 64,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_: Any,
    ):
        if dim % num_heads:
            raise ValueError(f"GatedDeltaNet: dim {dim} must be divisible by num_heads {num_heads}")
        if conv_size < 1 or chunk_size < 1:
            raise ValueError(
                f"GatedDeltaNet: conv_size and chunk_size must be >= 1, got "
                f"conv_size={conv_size}, chunk_size={chunk_size}"
            )
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.conv_size, self.chunk_size, self.dtype = conv_size, chunk_size, dtype
        linear = lambda d_out, **kw: nnx.Linear(dim, d_out, dtype=dtype, rngs=rngs, **kw)
        self.qkv = linear(3 * dim, use_bias=False)
        bound = 1.0 / math.sqrt(conv_size)  # PyTorch's Conv1d default for a depthwise filter
        self.conv = nnx.Param(
            jax.random.uniform(rngs.params(), (conv_size, 3 * dim), minval=-bound, maxval=bound)
        )
        self.beta = linear(num_heads)
        self.decay = linear(num_heads, use_bias=False)
        self.a_log = nnx.Param(
            jnp.log(jax.random.uniform(rngs.params(), (num_heads,), minval=1.0, maxval=16.0))
        )
        dt = jnp.exp(
            jax.random.uniform(
                rngs.params(), (num_heads,), minval=math.log(1e-3), maxval=math.log(0.1)
            )
        )
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # softplus⁻¹(dt)
        self.gate = linear(dim, use_bias=False)
        self.norm = nnx.Param(jnp.ones((self.head_dim,)))
        self.wo = linear(dim, use_bias=False)

    def empty_cache(self, batch: int) -> GatedDeltaCache:
        return GatedDeltaCache.empty(
            batch, self.num_heads, self.head_dim, self.conv_size, self.dtype
        )

    def __call__(self, x: jax.Array, cache: GatedDeltaCache | None = None):
        b, t, dim = x.shape
        n, h, w = self.num_heads, self.head_dim, self.conv_size
        qkv = self.qkv(x)  # (B, T, 3D)
        past = (
            jnp.zeros((b, w - 1, 3 * dim), qkv.dtype) if cache is None else cache.conv
        )  # causal padding, or the previous call's last inputs
        ext = jnp.concatenate([past.astype(qkv.dtype), qkv], axis=1)  # (B, W − 1 + T, 3D)
        kernel = self.conv[...].astype(qkv.dtype)
        mixed = sum(ext[:, i : i + t] * kernel[i] for i in range(w))  # (B, T, 3D), causal
        q, k, v = jnp.split(jax.nn.silu(mixed), 3, axis=-1)  # 3 × (B, T, D)
        q, k, v = (y.reshape(b, t, n, h).astype(jnp.float32) for y in (q, k, v))
        l2 = lambda y: y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-6)
        q, k = l2(q) / math.sqrt(h), l2(k)  # (B, T, N, H)
        beta = jax.nn.sigmoid(self.beta(x).astype(jnp.float32))  # (B, T, N)
        dt = jax.nn.softplus(self.decay(x).astype(jnp.float32) + self.dt_bias[...])  # (B, T, N)
        g = -jnp.exp(self.a_log[...]) * dt  # log α <= 0: (B, T, N)
        if cache is None:
            o = delta_rule(q, k, v, beta, log_decay=g, chunk_size=self.chunk_size)
        elif t == 1:  # a decoding step: O(1)
            o, state = delta_rule_step(cache.state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0])
            o = o[:, None]  # (B, 1, N, H)
        else:  # a chunked prefill from the cached state
            o, state = delta_rule(
                q, k, v, beta, log_decay=g, chunk_size=self.chunk_size,
                initial_state=cache.state, return_state=True,
            )  # fmt: skip
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6) * self.norm[...]
        gate = jax.nn.silu(self.gate(x).astype(jnp.float32)).reshape(b, t, n, h)
        y = self.wo((o * gate).reshape(b, t, dim).astype(x.dtype))  # (B, T, D)
        if cache is None:
            return y
        conv = ext[:, ext.shape[1] - (w - 1) :]  # the last W − 1 inputs: (B, W − 1, 3D)
        return y, GatedDeltaCache(state, conv.astype(cache.conv.dtype), cache.length + t)


LAYERS = {
    "linear": LinearAttention,
    "delta": FastWeightAttention,
    "caterpillar": CaterpillarAttention,
    "gated_delta": GatedDeltaNet,
}
