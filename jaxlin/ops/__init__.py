"""The recurrence ops of jaxlin: the diagonal-gated family G and the delta rule D.

Each op returns `(o, final_state)` and takes `impl` in {"auto", "reference",
"xla", "pallas"}; see docs/design.md and the docstrings of each op. `FAMILIES`
holds each family as one entry (op, step, span summary, chunked terms, kernel
adapter); `jaxlin.ops.span` is the span's affine effect on the state.
"""

from jaxlin.ops.attention import dot_product_attention
from jaxlin.ops.delta import delta_rule, delta_rule_step, delta_span_summary
from jaxlin.ops.families import FAMILIES, Family
from jaxlin.ops.gated import (gated_linear_attention, gated_linear_attention_step,
                              gated_span_summary)
from jaxlin.ops.span import SpanSummary

__all__ = [
    "FAMILIES",
    "Family",
    "SpanSummary",
    "dot_product_attention",
    "delta_rule",
    "delta_rule_step",
    "delta_span_summary",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "gated_span_summary",
]
