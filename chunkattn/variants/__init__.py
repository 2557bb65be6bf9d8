"""Linear-time relatives of softmax attention, each a chunked scan (issue: variants)."""

from chunkattn.variants.caterpillar import caterpillar
from chunkattn.variants.delta import delta_rule, delta_rule_reference, delta_rule_step
from chunkattn.variants.linear import dpfp, linear_attention

__all__ = [
    "caterpillar",
    "delta_rule",
    "delta_rule_reference",
    "delta_rule_step",
    "dpfp",
    "linear_attention",
]
