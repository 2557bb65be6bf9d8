"""Flax integration: an exact drop-in `attention_fn` for linen and nnx attention modules."""

from chunkattn.nn.attention_fn import attention_fn, make_attention_fn

__all__ = ["attention_fn", "make_attention_fn"]
