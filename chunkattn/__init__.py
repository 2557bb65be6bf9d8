"""chunkattn: exact softmax attention in memory linear in the sequence length, for JAX and Flax.

Shape legend, used everywhere public:
  B batch, T query length, S key/value length, N query heads, K kv heads (K divides N),
  H head dim, Hv value head dim. Arrays are [B, T, N, H] (query), [B, S, K, H] (key),
  [B, S, K, Hv] (value); masks and biases broadcast to [B, N, T, S]; lse is [B, N, T].

Start with `dot_product_attention`; `reference_attention` is the dense float32 oracle;
`summarize` / `merge` / `ChunkSummary` are the chunk-summary primitives the core is built from;
`decode_attention` serves a few new queries against a KV cache; `varlen_attention` attends
within packed variable-length sequences (FlashAttention's cu_seqlens API).
"""

from chunkattn.api import dot_product_attention
from chunkattn.chunked import ChunkConfig
from chunkattn.decode import DecodeConfig, decode_attention
from chunkattn.reference import reference_attention
from chunkattn.summary import ChunkSummary, merge, summarize
from chunkattn.varlen import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "ChunkConfig",
    "ChunkSummary",
    "DecodeConfig",
    "decode_attention",
    "dot_product_attention",
    "merge",
    "reference_attention",
    "summarize",
    "varlen_attention",
]
