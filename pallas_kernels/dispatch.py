"""Which kernel runs a call: platform detection, kernel options, support predicates.

`jaxlin.ops` asks `kernel_platform(impl, options, supports)` for every call with
impl "pallas" or "auto": it answers the platform whose kernel runs the call
("gpu" or "tpu"), or None for the XLA chunked form. "auto" never picks a
kernel on CPU; "pallas" on CPU falls back to XLA (with a warning) unless the
options ask for the Pallas interpreter.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.block_sizes import BlockSizes

KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
GPU_DIMS = (16, 32, 64, 128, 256)     # powers of two Triton tiles hold in registers
TPU_DIMS = (64, 128, 256)
# Every GPU K runs `fused_terms`: the gradient kernels work by key blocks of block_k, and at
# K = 256 the UT forward walks two 128-column blocks of K (Triton 3.9, sm_90: 24 B spilled
# per thread; benchmarks/kernel_resources.py --K 256).
FUSED_TERMS_MAX_K = 256


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """How `impl="pallas"` runs.

  platform: "gpu" or "tpu" kernel; default: the platform of the default backend.
    Another platform than the backend's runs only with `interpret`, or under
    `jax.export(..., platforms=[...])` (lowering checks without the hardware).
  interpret: run the kernel in the Pallas interpreter (CPU tests of either kernel).
  block_sizes: tiling; default `BlockSizes.default(platform, K, V)`.
  fused_terms: on GPU, run every G- and D-family call (K <= 256) through
    `pallas_kernels.fused_terms`, whose kernels form the in-chunk terms (scores,
    decays, document masks, the delta rule's UT transform) themselves; False forms
    them in XLA and runs the generic `chunk_recurrence` kernels.
  """
  platform: str | None = None
  interpret: bool = False
  block_sizes: BlockSizes | None = None
  fused_terms: bool = True


def backend_platform() -> str:
  """"gpu", "tpu" or "cpu" for the default backend."""
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def supports_dims(platform: str, key_dim: int, value_dim: int, dtype: jnp.dtype) -> bool:
  """Whether the chunk-recurrence kernel of `platform` takes K, V and the input dtype."""
  dims = GPU_DIMS if platform == "gpu" else TPU_DIMS if platform == "tpu" else ()
  return (key_dim in dims and value_dim in dims
          and any(jnp.dtype(dtype) == jnp.dtype(d) for d in KERNEL_DTYPES))


def uses_fused_terms(platform: str, key_dim: int) -> bool:
  """Whether a kernel call runs `pallas_kernels.fused_terms` (GPU, K <= FUSED_TERMS_MAX_K)
  rather than the XLA terms and `chunk_recurrence`."""
  return platform == "gpu" and key_dim <= FUSED_TERMS_MAX_K


def kernel_platform(impl: str, options: KernelOptions | None,
                    supports: Callable[[str], bool]) -> str | None:
  """The platform whose kernel runs this call, or None for the XLA form."""
  if impl not in ("auto", "pallas"):
    return None
  options = options or KernelOptions()
  backend = backend_platform()
  if impl == "auto" and backend not in ("gpu", "tpu"):
    return None
  platform = options.platform or backend
  if platform not in ("gpu", "tpu"):
    warnings.warn(f"impl='pallas' on the {backend!r} backend: no kernel runs there; using "
                  "the XLA chunked form (pass KernelOptions(platform=..., interpret=True) "
                  "to run a kernel in the Pallas interpreter)", stacklevel=3)
    return None
  if not supports(platform):
    if impl == "pallas":
      warnings.warn(f"impl='pallas': the {platform} kernel does not support this call "
                    "(see pallas_kernels.dispatch.supports_dims); using the XLA chunked "
                    "form", stacklevel=3)
    return None
  return platform


def kernel_chunk(time: int) -> int:
  """Chunk length of the kernels: 64, or the power of two >= max(T, 16) when shorter."""
  chunk = 16
  while chunk < min(time, 64):
    chunk *= 2
  return chunk
