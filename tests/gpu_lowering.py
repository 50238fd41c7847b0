"""Lowering the GPU kernels without a GPU: the StableHLO and the Triton IR of each kernel.

`export_cuda` runs the Pallas -> Triton lowering under an abstract H100 mesh (docs/design.md, Kernels);
the lowering tests use it. `triton_kernels` also returns each kernel's Triton IR (TTIR) text and
launch parameters; `triton_resources` compiles one with the pip `triton` package (extra
`resources`; no GPU or driver needed) and reads its registers, spills and shared memory, as
XLA's own copy of Triton would roughly give them (`benchmarks/kernel_resources.py`).

Test tooling: it lives beside the tests, not in the package (the benchmark adds tests/ to its path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
import subprocess
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from jaxlin.ops import delta_rule, gated_linear_attention

H100_KIND = "NVIDIA H100 80GB HBM3"
TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One `pallas_call` as the Triton backend lowered it.

  name: the kernel's name (`pallas_call(name=...)`).
  ttir: the Triton IR module, as text (parseable by `triton.compile`).
  num_warps, num_stages: its launch parameters.
  """
  name: str
  ttir: str
  num_warps: int
  num_stages: int


def export_cuda(fn: Callable, *args: Any) -> str:
  """The StableHLO text of `fn(*args)` exported for CUDA under an abstract H100 mesh.

  Auto axes: under jax 0.12's default (Explicit) the lowering of a reduction inside a kernel
  gives its 1-D result the mesh's 2-D sharding spec and fails.
  """
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # pylint: disable=import-outside-toplevel
  h100 = AbstractDevice(device_kind=H100_KIND, num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=h100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        fn, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args).mlir_module()


@contextlib.contextmanager
def _recording_triton_modules() -> Iterator[list[str]]:
  """Records the TTIR text of every kernel Pallas lowers to Triton inside the block.

  Uses jax's private Triton registration module (present in jax 0.10 to 0.12); raises a clear
  error if a newer jax moved it.
  """
  try:
    from jax._src.pallas.triton import pallas_call_registration as registration  # pylint: disable=import-outside-toplevel
    lower = registration.lowering.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError) as e:
    raise RuntimeError(f"jax {jax.__version__}: the Pallas Triton lowering moved; "
                       "update tests/gpu_lowering.py") from e
  texts: list[str] = []

  def recording_lower(*args: Any, **kwargs: Any) -> Any:
    result = lower(*args, **kwargs)
    texts.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = recording_lower
  try:
    yield texts
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower


OP_FAMILIES = ("gated", "gated-per-key", "rwkv6", "delta")


def op_gradient(family: str, key_dim: int, value_dim: int, dtype: Any, time_: int,
                documents: bool, options: Any) -> tuple[Callable, tuple]:
  """(fn, args): the jitted value_and_grad of a loss of one op with impl="pallas" and
  `options` (a `dispatch.KernelOptions`), and its abstract arguments (batch 1, 2 heads), to
  lower every kernel of the forward and backward pass. family: "gated" (scalar gate),
  "gated-per-key", "rwkv6" (per-key gate and the bonus) or "delta" (Gated DeltaNet)."""
  if family not in OP_FAMILIES:
    raise ValueError(f"family={family!r}: expected one of {OP_FAMILIES}")
  ids = lambda seg: seg if documents else None

  def loss(q, k, v, g, beta, seg, bonus):
    if family == "delta":
      o, final = delta_rule(q, k, v, beta, g, segment_ids=ids(seg), impl="pallas",
                            kernel=options, output_final_state=True)
    else:
      o, final = gated_linear_attention(q, k, v, g, segment_ids=ids(seg), impl="pallas",
                                        bonus=bonus if family == "rwkv6" else None,
                                        kernel=options, output_final_state=True)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  scalar = spec(1, time_, 2, dt=jnp.float32)
  per_key = family in ("gated-per-key", "rwkv6")
  gate = spec(1, time_, 2, key_dim, dt=jnp.float32) if per_key else scalar
  args = (spec(1, time_, 2, key_dim), spec(1, time_, 2, key_dim), spec(1, time_, 2, value_dim),
          gate, scalar, spec(1, time_, dt=jnp.int32), spec(2, key_dim, dt=jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 6))), args


_FUNC_NAME = re.compile(r"tt\.func public @(\w+)")
# The backend_config dictionary of a Triton custom call prints its keys sorted.
_LAUNCH = re.compile(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


def triton_kernels(fn: Callable, *args: Any) -> list[TritonKernel]:
  """Every Triton kernel of `fn(*args)` lowered for CUDA (H100), in lowering order.

  A kernel reached twice with the same IR and launch parameters is listed once.
  """
  with _recording_triton_modules() as texts:
    module = export_cuda(fn, *args)
  launches: dict[str, set[tuple[int, int]]] = {}
  for name, stages, warps in _LAUNCH.findall(module):
    launches.setdefault(name, set()).add((int(warps), int(stages)))
  kernels: list[TritonKernel] = []
  for text in texts:
    match = _FUNC_NAME.search(text)
    if match is None:
      raise RuntimeError("a lowered Triton module has no public tt.func")
    name = match.group(1)
    params = launches.get(name, set())
    if len(params) != 1:
      raise RuntimeError(f"kernel {name}: expected one (num_warps, num_stages) in the exported "
                         f"module, found {sorted(params)}")
    (warps, stages), = params
    kernel = TritonKernel(name=name, ttir=text, num_warps=warps, num_stages=stages)
    if kernel not in kernels:
      kernels.append(kernel)
  return kernels


_USAGE = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def triton_resources(kernel: TritonKernel, arch: int = 90) -> dict[str, int]:
  """{"regs": registers per thread, "stack": local-memory bytes per thread (register spills),
  "shared": shared-memory bytes} of `kernel` compiled by the installed `triton` package for
  sm_`arch` with the kernel's own num_warps and num_stages, read from the cubin by the
  cuobjdump that ships with triton."""
  import os  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the current default; no warning
  try:
    import triton  # pylint: disable=import-outside-toplevel
    from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError("triton_resources needs the triton package: "
                       "pip install -e '.[resources]'") from e
  with tempfile.TemporaryDirectory() as tmp:
    source = pathlib.Path(tmp) / f"{kernel.name}.ttir"
    source.write_text(kernel.ttir)
    compiled = triton.compile(str(source), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": kernel.num_warps,
                                       "num_stages": kernel.num_stages})
    cubin = pathlib.Path(tmp) / f"{kernel.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    report = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                            capture_output=True, text=True, check=True).stdout
  match = _USAGE.search(report)
  if match is None:
    raise RuntimeError(f"kernel {kernel.name}: no resource usage in cuobjdump's output:\n{report}")
  return {"regs": int(match.group(2)), "stack": int(match.group(3)),
          "shared": int(compiled.metadata.shared)}
