"""The recurrence ops of jaxlin: the diagonal-gated family G and the delta rule D.

Each op returns `(o, final_state)` and takes `impl` in {"auto", "reference",
"xla", "pallas"}; see DESIGN.md §3-§4 and the docstrings of each op.
"""

from jaxlin.ops.attention import dot_product_attention
from jaxlin.ops.delta import delta_rule, delta_rule_step
from jaxlin.ops.gated import gated_linear_attention, gated_linear_attention_step

__all__ = [
    "dot_product_attention",
    "delta_rule",
    "delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_step",
]
