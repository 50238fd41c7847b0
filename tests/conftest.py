"""pytest configuration: make ``tests/_helpers.py`` importable under any import mode."""
from __future__ import annotations

import os
import sys

import jax

# Full float32 matmuls everywhere: on GPUs jax defaults to TF32 (10-bit mantissa) for float32
# products, which would make the float32 reference itself inexact when the tests run there.
jax.config.update("jax_default_matmul_precision", "highest")

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# configs/ is a top-level package of the repository (run.py imports it from the repository root)
_REPO_DIR = os.path.dirname(_TESTS_DIR)
if _REPO_DIR not in sys.path:
    sys.path.insert(0, _REPO_DIR)


import pytest  # noqa: E402  (after the path setup above)

# jaxlin's XLA:CPU workaround (jaxlin/xla_cpu_workaround.py) before any test computes anything
import jaxlin  # noqa: E402,F401  pylint: disable=unused-import


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code_after_each_module():
  """Drops JAX's compiled executables after every test module.

  The suite compiles thousands of programs in one process (the Pallas interpreter's
  unrolled kernels among them); keeping them all made the process large, and on jax
  0.10.2 XLA:CPU once crashed compiling a later module's program (a segfault in
  `backend_compile_and_load`). Nothing is shared across modules that needs them.
  """
  yield
  jax.clear_caches()
