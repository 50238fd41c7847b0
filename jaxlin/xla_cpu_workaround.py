"""A workaround for an XLA:CPU crash of jaxlib 0.10.2, applied when jaxlin is imported.

jaxlib 0.10.2's XLA:CPU hands dot fusions to YNNPACK. On an AVX2-only x86 host (an AMD EPYC
without AVX-512, 2026-11-23) the compiled gradient of the per-key-gate chunked form
(`tests/test_ops_gate_tiers.py`, tier 1, impl "xla") dies there with a segmentation fault;
with `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusion) the same program runs and
matches the reference, and jax 0.12 runs it with the default flags.

XLA reads XLA_FLAGS when its CPU client starts, i.e. at the first computation, so the flag is
added to the environment at import: importing jaxlin after jax has already computed something
leaves the running client as it is. A flag the user set in XLA_FLAGS is never changed. Other
jaxlib versions are left alone (an XLA build that does not know a flag aborts on it).
"""

from __future__ import annotations

import importlib.metadata
import os
import re

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
AFFECTED_JAXLIB = ((0, 10, 2), (0, 11, 0))   # [first, end) of the versions that crash


def jaxlib_version() -> tuple[int, ...]:
  """The installed jaxlib's (major, minor, patch), () when it is not installed."""
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def xla_flags_without_ynn_fusion(flags: str, version: tuple[int, ...]) -> str:
  """`flags` (an XLA_FLAGS value) with YNNPACK fusion turned off where `version` crashes,
  unless the flag is already there."""
  first, end = AFFECTED_JAXLIB
  if not (first <= version < end) or YNN_FUSION_FLAG in flags:
    return flags
  return f"{flags} {YNN_FUSION_FLAG}=".strip()


def apply() -> None:
  """Sets XLA_FLAGS for this process (module docstring)."""
  flags = os.environ.get("XLA_FLAGS", "")
  new_flags = xla_flags_without_ynn_fusion(flags, jaxlib_version())
  if new_flags != flags:
    os.environ["XLA_FLAGS"] = new_flags
