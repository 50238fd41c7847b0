"""`benchmarks/kernel_timing.py`: its agreement check (each impl's o and gradients against the float32
XLA form on the same inputs) on tiny shapes, on CPU.

The check is what makes a GPU run of the benchmark also a correctness run at full size (the
fused kernels and fla side by side), so it is tested here: it names every gradient of each
case, the bf16 XLA form agrees with it, and the Pallas GPU kernels in the interpreter agree
with it (slow).
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_timing.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_kernels", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

# two chunks of 64, so the state terms count
TINY = ["--T", "128", "--B", "1", "--H", "2", "--K", "32", "--V", "32", "--runs", "1"]
# bf16 q, k, v against float32 math on the same rounded inputs: the outputs and gradients are
# rounded to bf16 (relative 2^-9) and the kernels multiply bf16-rounded intermediates; measured
# 1.5e-3 to 5.3e-3 on such shapes. A wrong gate, scale or mask is off by far more.
BF16_AGREEMENT = 2e-2
INPUTS = {"simple_gla": ("q", "k", "v", "g"), "gla": ("q", "k", "v", "g"),
          "rwkv6": ("q", "k", "v", "g", "u"), "gated_deltanet": ("q", "k", "v", "g", "beta")}


def _run(tmp_path: pathlib.Path, *args: str) -> dict[str, Any]:
  out = tmp_path / "kernels.json"
  result = bench.main([*TINY, *args, "--out", str(out)])
  assert out.exists()
  return result


def _assert_agreement(result: dict[str, Any], impls: list[str]) -> None:
  found = {(a["case"], a["impl"]): a["relative_error"] for a in result["agreement"]}
  assert set(found) == {(c, i) for c in bench.CASES for i in impls}
  for (case, impl), errors in found.items():
    assert set(errors) == {"o", *(f"d{n}" for n in INPUTS[case])}, (case, impl)
    worst = max(errors, key=errors.get)
    assert errors[worst] < BF16_AGREEMENT, (case, impl, worst, errors[worst])


def test_relative_errors_is_the_relative_frobenius_norm() -> None:
  x = np.arange(1.0, 7.0).reshape(2, 3)
  errors = bench.relative_errors({"o": 1.25 * x, "dq": x}, {"o": x, "dq": x})
  assert errors["o"] == pytest.approx(0.25)
  assert errors["dq"] == 0.0
  with pytest.raises(ValueError, match=r"\['dv'\] missing"):
    bench.relative_errors({"o": x}, {"o": x, "dv": x})


def test_every_case_is_checked_against_float32_math(tmp_path: pathlib.Path) -> None:
  _assert_agreement(_run(tmp_path, "--impls", "xla"), ["xla"])


def test_the_check_sees_a_wrong_gate(tmp_path: pathlib.Path) -> None:
  """An impl with twice the gate (a plausible convention slip) fails the agreement bound."""
  inputs = bench.make_inputs("simple_gla", 1, 64, 2, 32, 32)
  reference = bench.reference_outputs("simple_gla", inputs, np.dtype("float32"))
  slipped = bench.jax_outputs("simple_gla", "xla", {**inputs, "g": 2 * inputs["g"]},
                              np.dtype("float32"))
  errors = bench.relative_errors(slipped, reference)
  assert errors["o"] > 10 * BF16_AGREEMENT


@pytest.mark.slow
def test_gpu_kernels_in_the_interpreter_agree(tmp_path: pathlib.Path) -> None:
  result = _run(tmp_path, "--impls", "pallas", "pallas-terms", "--interpret", "gpu")
  _assert_agreement(result, ["pallas", "pallas-terms"])
