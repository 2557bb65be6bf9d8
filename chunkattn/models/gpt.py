"""A small GPT in one readable file (nnx): pre-LayerNorm blocks, MLP, rotary or learned
positions, optional tied embeddings, chunkattn attention, and `generate()` with a KV cache.

Byte-level by default (vocab 256). The attention implementation is a config field:
"chunked", "pallas", "pallas_mosaic", "splash", "pallas_tpu", "xla" (chunkattn's dispatcher,
`implementation=`), "cudnn" (`jax.nn.dot_product_attention`), or
a linear-time variant "linear", "delta", "caterpillar" (`chunkattn.variants.layers`, no KV cache),
"gated_delta" (Gated DeltaNet, which decodes from its recurrent state), or "hybrid": layer i is
`hybrid_pattern[i % len(hybrid_pattern)]`, g for Gated DeltaNet and s for softmax (chunked), as
Qwen3-Next interleaves them.
`sinks=True` gives every attention layer learnable attention sinks (gpt-oss), one logit per head.

Given a mesh with axes "dp", "sp", "tp", the model runs data × sequence × tensor parallel: the
activations [B, T, D] are sharded [dp, sp, -], every attention layer is ring attention over "sp"
with its heads over "tp", and the MLP is Megatron's (`fc` column-parallel, `proj` row-parallel).
The parameters carry the "tp" annotations (`chunkattn.nn.layers.partitioned`); a trainer places
them with `nnx.get_named_sharding` (chunkattn.train does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from chunkattn.nn.layers import KVCache, MultiHeadAttention, partitioned

Array = jax.Array

ATTENTION = (
    "chunked", "pallas", "pallas_mosaic", "splash", "pallas_tpu", "xla", "cudnn", "linear", "delta",
    "caterpillar", "gated_delta", "hybrid",
)  # fmt: skip
HYBRID_LAYERS = {"g": "gated_delta", "s": "chunked"}  # the letters of GPTConfig.hybrid_pattern
SINKS = ("chunked", "pallas", "pallas_mosaic", "splash", "pallas_tpu", "xla")  # take sinks


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens
    max_seq_len: int = 1024  # longest sequence (cache size for generate, learned positions)
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # query heads per block
    num_kv_heads: int | None = None  # key/value heads (GQA); None = num_heads
    dim: int = 256  # model width D
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D
    rope: bool = True  # rotary positions (else learned absolute positions)
    tie_embeddings: bool = True  # output projection = token embedding transposed
    attention: str = "chunked"  # one of ATTENTION
    dtype: Any = jnp.float32  # computation dtype
    dpfp_nu: int = 1  # attention="delta": DPFP ν, key features 2·H·ν (capacity of the fast weights)
    caterpillar_heads: int = 4  # attention="caterpillar": CH, recurrent rows mixed by the gates
    caterpillar_length: int = 16  # attention="caterpillar": CL, the period and softmax window
    sinks: bool = False  # attention sinks: a learned logit per head in each softmax denominator
    hybrid_pattern: str = "gs"  # attention="hybrid": layer i is pattern[i % len], g/s as above

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(
                f"GPTConfig.attention must be one of {ATTENTION}, got {self.attention!r}"
            )
        for name in (
            "vocab_size",
            "max_seq_len",
            "num_layers",
            "num_heads",
            "dim",
            "mlp_ratio",
            "dpfp_nu",
            "caterpillar_heads",
            "caterpillar_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sinks and self.attention not in SINKS:
            raise ValueError(
                f"GPTConfig.sinks needs attention in {SINKS} (their softmax takes sinks), got "
                f"attention={self.attention!r}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"GPTConfig.dim={self.dim} must divide by num_heads={self.num_heads}")
        if not self.hybrid_pattern or set(self.hybrid_pattern) - set(HYBRID_LAYERS):
            raise ValueError(
                f"GPTConfig.hybrid_pattern must be letters {'/'.join(HYBRID_LAYERS)} "
                f"({', '.join(f'{k}: {v}' for k, v in HYBRID_LAYERS.items())}), got "
                f"{self.hybrid_pattern!r}"
            )
        if self.attention == "hybrid" and len(set(self.layer_attention)) < 2:
            raise ValueError(
                f"GPTConfig.hybrid_pattern={self.hybrid_pattern!r} with num_layers="
                f"{self.num_layers} gives only {self.layer_attention[0]} layers: a hybrid needs"
                " both"
            )

    @property
    def layer_attention(self) -> tuple[str, ...]:
        """The attention of each block: `attention`, or the hybrid pattern's letters cycled."""
        if self.attention != "hybrid":
            return (self.attention,) * self.num_layers
        p = self.hybrid_pattern
        return tuple(HYBRID_LAYERS[p[i % len(p)]] for i in range(self.num_layers))


def _on_mesh(x: Array, mesh: Any, *axes: str | None) -> Array:
    """x constrained to shard its dimensions over mesh `axes` (an axis the mesh lacks: not
    sharded); x itself without a mesh."""
    if mesh is None:
        return x
    spec = P(*(a if a in mesh.shape else None for a in axes))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class _CudnnAttention(MultiHeadAttention):
    """The same layer through `jax.nn.dot_product_attention(implementation="cudnn")`."""

    def __call__(self, x, *, cache=None, segment_ids=None):
        if cache is not None or segment_ids is not None:
            raise NotImplementedError("the cudnn attention baseline has no cache or segment ids")
        batch, seq, _ = x.shape
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim)  # (B, T, N, H)
        k = self.wk(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)  # (B, T, K, H)
        v = self.wv(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.rope:
            from chunkattn.nn.layers import rotary

            pos = jnp.arange(seq)
            q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return self.wo(out.reshape(batch, seq, -1))


class Block(nnx.Module):
    def __init__(
        self, cfg: GPTConfig, *, rngs: nnx.Rngs, mesh: Any = None, attention: str | None = None
    ):
        """`attention`: this block's kind (default cfg.attention; a hybrid's layers differ)."""
        attention = attention or cfg.attention
        cudnn = attention == "cudnn"
        layer = _CudnnAttention if cudnn else MultiHeadAttention
        variant = {}  # the knobs of a chunkattn.variants layer (they ignore the softmax ones)
        if attention in ("linear", "delta", "caterpillar", "gated_delta"):
            from chunkattn.variants.layers import LAYERS

            layer = LAYERS[attention]
            variant = {
                "delta": {"nu": cfg.dpfp_nu},
                "caterpillar": {"height": cfg.caterpillar_heads, "length": cfg.caterpillar_length},
            }.get(attention, {})
        self.ln1 = nnx.LayerNorm(cfg.dim, dtype=cfg.dtype, rngs=rngs)
        self.attn = layer(
            cfg.dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            rope=cfg.rope,
            implementation=None if cudnn else attention,
            dtype=cfg.dtype,
            rngs=rngs,
            **({} if mesh is None else {"mesh": mesh}),
            **({"use_sinks": True} if cfg.sinks else {}),
            **variant,
        )
        self.ln2 = nnx.LayerNorm(cfg.dim, dtype=cfg.dtype, rngs=rngs)
        hidden = cfg.mlp_ratio * cfg.dim  # Megatron: fc column-parallel, proj row-parallel
        self.fc = nnx.Linear(
            cfg.dim,
            hidden,
            dtype=cfg.dtype,
            kernel_metadata=partitioned(None, "tp"),
            bias_metadata=partitioned("tp"),
            rngs=rngs,
        )
        self.proj = nnx.Linear(
            hidden, cfg.dim, dtype=cfg.dtype, kernel_metadata=partitioned("tp", None), rngs=rngs
        )
        self.mesh = mesh

    def __call__(self, x, cache=None):
        a = self.attn(self.ln1(x), cache=cache)
        a, cache = a if cache is not None else (a, None)
        x = x + a  # (B, T, D)
        h = _on_mesh(jax.nn.gelu(self.fc(self.ln2(x))), self.mesh, "dp", "sp", "tp")  # (B, T, 4D)
        x = _on_mesh(x + self.proj(h), self.mesh, "dp", "sp", None)  # (B, T, D)
        return x, cache


class GPT(nnx.Module):
    """Decoder-only transformer: tokens [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, mesh: Any = None):
        """`mesh`: a Mesh with axis "sp" and optionally "dp", "tp" (module docstring)."""
        if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError("GPTConfig.attention='cudnn' needs a GPU backend")
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype, rngs=rngs)
        self.pos = (
            None if cfg.rope else nnx.Embed(cfg.max_seq_len, cfg.dim, dtype=cfg.dtype, rngs=rngs)
        )
        blocks = [Block(cfg, rngs=rngs, mesh=mesh, attention=a) for a in cfg.layer_attention]
        self.mesh = mesh
        self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
        self.ln_f = nnx.LayerNorm(cfg.dim, dtype=cfg.dtype, rngs=rngs)
        self.head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, dtype=cfg.dtype, rngs=rngs)
        )

    def __call__(self, tokens: Array, caches: list[KVCache] | None = None):
        batch, seq = tokens.shape
        if seq > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds GPTConfig.max_seq_len="
                f"{self.cfg.max_seq_len} (tokens.shape={tokens.shape})"
            )
        x = self.embed(tokens)  # (B, T, D)
        if self.pos is not None:
            start = 0 if caches is None else caches[0].length
            x = x + self.pos(start + jnp.arange(seq))
        x = _on_mesh(x, self.mesh, "dp", "sp", None)  # (B, T, D)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, None if caches is None else caches[i])
            new_caches.append(c)
        x = self.ln_f(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # (B, T, V)
        return (
            logits.astype(jnp.float32)
            if caches is None
            else (logits.astype(jnp.float32), new_caches)
        )

    def empty_caches(self, batch: int, max_len: int | None = None) -> list[Any]:
        """A KVCache per softmax layer; a Gated DeltaNet layer's own (recurrent state) cache."""
        cfg = self.cfg
        kv = cfg.num_kv_heads or cfg.num_heads
        return [
            block.attn.empty_cache(batch)
            if hasattr(block.attn, "empty_cache")
            else KVCache.empty(
                batch, max_len or cfg.max_seq_len, kv, cfg.dim // cfg.num_heads, cfg.dtype
            )
            for block in self.blocks
        ]


def generate(
    model: GPT,
    prompt: Array,
    max_new_tokens: int,
    *,
    rng: Array,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Array:
    """Sample continuations of prompt [B, T0] with the KV cache: one prefill, then one token a step.

    temperature 0 is greedy; top_k keeps the k most likely tokens. Returns [B, T0 + new].
    """
    batch, t0 = prompt.shape
    if t0 + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {t0} + max_new_tokens {max_new_tokens} exceeds "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, caches, key):
        logits, caches = nnx.merge(graphdef, state)(tokens, caches)
        logits = logits[:, -1]  # (B, V)
        if temperature == 0:
            return jnp.argmax(logits, -1), caches
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1), caches

    caches = model.empty_caches(batch, t0 + max_new_tokens)
    out = [prompt]
    tokens = prompt
    for i in range(max_new_tokens):
        nxt, caches = step(state, tokens, caches, jax.random.fold_in(rng, i))
        tokens = nxt[:, None].astype(prompt.dtype)
        out.append(tokens)
    return jnp.concatenate(out, axis=1)
