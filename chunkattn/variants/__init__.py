"""Linear-time relatives of softmax attention, each a chunked scan (issue: variants)."""

from chunkattn.variants.linear import dpfp, linear_attention

__all__ = ["dpfp", "linear_attention"]
