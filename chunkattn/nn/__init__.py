"""Flax integration: a drop-in `attention_fn` for Flax's attention modules, and attention
layers (nnx and linen) with grouped-query heads, rotary positions and a KV cache."""

from chunkattn.nn.attention_fn import attention_fn, make_attention_fn
from chunkattn.nn.layers import KVCache, LinenMultiHeadAttention, MultiHeadAttention, rotary

__all__ = [
    "KVCache",
    "LinenMultiHeadAttention",
    "MultiHeadAttention",
    "attention_fn",
    "make_attention_fn",
    "rotary",
]
