"""The recurrence families, one registry entry each: `FAMILIES = {"gated": ..., "delta": ...}`.

A `Family` holds everything a layer or a parallel wrapper needs of a recurrence:

* `op(q, k, v, **inputs, scale=, initial_state=, segment_ids=, output_final_state=,
  chunk_size=, impl=)` -> (o, final state): the sequence op (reference / xla / pallas);
* `step(q, k, v, **inputs, state=, scale=)` -> (o, state): one decoding token;
* `span_summary(k, v, **inputs, segment_ids=, chunk_size=, impl=)` -> `SpanSummary`: the
  span's affine effect S_end = M S_start + N (the unit of sequence parallelism);
* `chunk_terms`: the in-chunk terms builder of the chunked form, and `kernel`: the adapter
  to the Pallas kernels (`chunked(...)`), which the op dispatches to;
* `token_inputs`: the per-token inputs the op takes by keyword ([B, T, H] or
  [B, T, H, K]; a decoding step takes them without T), `head_inputs`: per-head constants,
  `write_strength`: whether `beta` is required, `per_key_gate`: whether g may be [.., K].

    gated (G): S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T                  `gated_linear_attention`
    delta (D): S_t = exp(g_t)(I - b_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T   `delta_rule`
    o_t = scale * S_t^T q_t (RWKV6's bonus reads S_{t-1} + Diag(u) k_t v_t^T)
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Callable

from jaxlin import validation
from jaxlin.ops import delta, delta_pallas, delta_terms, gated, gated_pallas, gated_terms


@dataclasses.dataclass(frozen=True)
class Family:
  """One recurrence family (see the module docstring)."""
  name: str
  op: Callable[..., Any]
  step: Callable[..., Any]
  span_summary: Callable[..., Any]
  chunk_terms: Callable[..., Any]
  kernel: ModuleType
  token_inputs: tuple[str, ...]
  head_inputs: tuple[str, ...] = ()
  write_strength: bool = False
  per_key_gate: bool = False


FAMILIES: dict[str, Family] = {
    "gated": Family(
        "gated", gated.gated_linear_attention, gated.gated_linear_attention_step,
        gated.gated_span_summary, gated_terms.chunk_terms, gated_pallas,
        token_inputs=("g",), head_inputs=("bonus",), per_key_gate=True),
    "delta": Family(
        "delta", delta.delta_rule, delta.delta_rule_step, delta.delta_span_summary,
        delta_terms.chunk_terms, delta_pallas,
        token_inputs=("beta", "g", "removal_key", "removal"), write_strength=True),
}


def family(name: str) -> Family:
  """FAMILIES[name], or a ValueError listing the families."""
  return FAMILIES[validation.choice("family", name, tuple(FAMILIES))]
