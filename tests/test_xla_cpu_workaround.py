"""jaxlin.xla_cpu_workaround: which XLA_FLAGS it writes (the crash itself is what
tests/test_ops_gate_tiers.py runs into on an AVX2-only host with jaxlib 0.10.2)."""
from __future__ import annotations

import os

import pytest

from jaxlin import xla_cpu_workaround as w

OFF = f"{w.YNN_FUSION_FLAG}="


@pytest.mark.parametrize("version", [(0, 10, 2), (0, 10, 9)])
def test_affected_jaxlib_turns_ynn_fusion_off(version: tuple[int, ...]) -> None:
  assert w.xla_flags_without_ynn_fusion("", version) == OFF
  assert (w.xla_flags_without_ynn_fusion("--xla_dump_to=/tmp/d", version)
          == f"--xla_dump_to=/tmp/d {OFF}")


def test_a_flag_the_user_set_is_kept() -> None:
  mine = f"{w.YNN_FUSION_FLAG}=dot"
  assert w.xla_flags_without_ynn_fusion(mine, (0, 10, 2)) == mine


@pytest.mark.parametrize("version", [(), (0, 10, 1), (0, 11, 0), (0, 11, 2), (0, 12, 0)])
def test_other_jaxlib_versions_are_left_alone(version: tuple[int, ...]) -> None:
  assert w.xla_flags_without_ynn_fusion("--xla_dump_to=/tmp/d", version) == "--xla_dump_to=/tmp/d"


def test_importing_jaxlin_applied_it() -> None:
  """The suite runs after `import jaxlin` (conftest), so XLA_FLAGS already is what the
  workaround makes of it: on an affected jaxlib, without the import, this would add the flag."""
  flags = os.environ.get("XLA_FLAGS", "")
  assert w.xla_flags_without_ynn_fusion(flags, w.jaxlib_version()) == flags
