"""Every kernel configuration the dispatcher can select lowers for TPU (Mosaic) and CUDA (Triton).

No accelerator is needed: `jax.export` runs the Pallas -> Mosaic lowering for platform "tpu"; the
Triton lowering runs for "cuda" under an abstract H100 mesh (docs/design.md §8). This catches block
shapes a backend rejects and primitives it cannot lower. It does not check VMEM / shared memory
sizes or run anything. Lowered: the forward and the backward kernel (the gradient of a loss).
Selectable: K, V in `dispatch.GPU_DIMS` / `dispatch.TPU_DIMS`, bf16 / f16 / f32 inputs, with and
without the delta rule's W_k, at the kernel chunk lengths 16, 32 and 64; and the GPU
`pallas_kernels.fused_terms` kernels through both ops (scalar and per-key gates, the delta
rule with K <= 128).
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

import _helpers as h
import gpu_lowering
from pallas_kernels import dispatch
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence import chunk_recurrence

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _lower(platform: str, key_dim: int, value_dim: int, dtype: jnp.dtype, with_w_k: bool,
           chunk: int = 64) -> str:
  rows, num = 2, 3
  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
  args = (spec(rows, num, chunk, key_dim), spec(rows, num, chunk, key_dim),
          spec(rows, num, chunk, chunk), spec(rows, num, chunk, value_dim),
          spec(rows, num, chunk, key_dim) if with_w_k else None,
          spec(rows, num, 1, key_dim, dt=jnp.float32), spec(rows, key_dim, value_dim, dt=jnp.float32))

  def loss(*xs):
    o, final = chunk_recurrence(*xs, platform=platform)
    return jnp.sum(o) + jnp.sum(final)

  argnums = tuple(i for i, x in enumerate(args) if x is not None)
  fn = jax.jit(jax.grad(loss, argnums))
  if platform == "tpu":
    return jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
  return h.export_cuda(fn, *args)


def _configs(platform: str) -> list[tuple]:
  dims = dispatch.TPU_DIMS if platform == "tpu" else dispatch.GPU_DIMS
  return [(platform, k, v, dt, w) for k, v, dt, w in
          itertools.product(dims, dims, DTYPES, (False, True))
          if dispatch.supports_dims(platform, k, v, dt)]


CONFIGS = _configs("tpu") + _configs("gpu")
MARKER = {"tpu": "tpu_custom_call", "gpu": "triton"}


@pytest.mark.parametrize("platform,key_dim,value_dim,dtype,with_w_k", CONFIGS,
                         ids=[f"{p}-K{k}-V{v}-{jnp.dtype(d).name}-{'delta' if w else 'gated'}"
                              for p, k, v, d, w in CONFIGS])
def test_kernel_lowers(platform: str, key_dim: int, value_dim: int, dtype: jnp.dtype,
                       with_w_k: bool) -> None:
  module = _lower(platform, key_dim, value_dim, dtype, with_w_k)
  assert module.count(MARKER[platform]) >= 2, "expected a forward and a backward kernel"


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("chunk", [16, 32])
def test_short_chunks_lower(platform: str, chunk: int) -> None:
  """Sequences shorter than 64 run the kernel with chunk 16 or 32 (`dispatch.kernel_chunk`)."""
  dim = 64
  module = _lower(platform, dim, dim, jnp.bfloat16, True, chunk=chunk)
  assert module.count(MARKER[platform]) >= 2


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("family", ["gated", "delta"])
def test_ops_lower_through_the_kernel(platform: str, family: str) -> None:
  """The whole op (XLA prep + kernel, packed documents, per-key gates) lowers with its gradient."""
  from jaxlin.ops import delta_rule, gated_linear_attention  # pylint: disable=import-outside-toplevel
  batch, time_, heads, dim = 1, 100, 2, 64
  spec = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  options = dispatch.KernelOptions(platform=platform)
  q, v = spec(batch, time_, heads, dim), spec(batch, time_, heads, dim)
  ids = spec(batch, time_, dt=jnp.int32)

  if family == "gated":
    def loss(q, k, v, g, ids):
      o, _ = gated_linear_attention(q, k, v, g, segment_ids=ids, impl="pallas", kernel=options)
      return jnp.sum(o.astype(jnp.float32))
    args = (q, q, v, spec(batch, time_, heads, dim, dt=jnp.float32), ids)
  else:
    def loss(q, k, v, beta, g, ids):
      o, _ = delta_rule(q, k, v, beta, g, segment_ids=ids, impl="pallas", kernel=options)
      return jnp.sum(o.astype(jnp.float32))
    scalar = spec(batch, time_, heads, dt=jnp.float32)
    args = (q, q, v, scalar, scalar, ids)
  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  if platform == "tpu":
    module = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
  else:
    module = h.export_cuda(fn, *args)
  assert module.count(MARKER[platform]) >= 2


FUSED_FAMILIES = ("gated", "gated-per-key", "delta")   # scalar gate, per-key gate, delta rule


def _fused_terms_configs() -> list:
  """(family, K, V, dtype, segments, T) of the `fused_terms` kernels: a representative set
  by default, the rest of K x V x dtype x documents marked slow."""
  fast = {(k, v, jnp.bfloat16, True) for k, v in ((16, 256), (64, 64), (128, 128), (256, 64))}
  fast |= {(64, 64, jnp.float16, False), (64, 64, jnp.float32, True)}
  every = [(k, v, jnp.bfloat16, True) for k in dispatch.GPU_DIMS for v in dispatch.GPU_DIMS]
  every += [(64, 64, dt, seg) for dt in (jnp.float16, jnp.float32) for seg in (False, True)]
  configs = []
  for family in FUSED_FAMILIES:
    for k, v, dt, seg in every:
      marks = () if (k, v, dt, seg) in fast else (pytest.mark.slow,)
      configs.append(pytest.param(family, k, v, dt, seg, 100, marks=marks,
                                  id=f"{family}-K{k}-V{v}-{jnp.dtype(dt).name}-"
                                     f"{'docs' if seg else 'nodocs'}"))
    for t in (20, 40):     # chunks of 16 and 32
      configs.append(pytest.param(family, 64, 64, jnp.bfloat16, False, t,
                                  id=f"{family}-K64-V64-bfloat16-T{t}"))
  # RWKV6: the per-key kernels (covered above) fed the queries one token ahead, in XLA
  configs.append(pytest.param("rwkv6", 128, 128, jnp.bfloat16, True, 100,
                              id="rwkv6-K128-V128-bfloat16-docs"))
  return configs


FUSED_TERMS_KERNELS = {
    "gated": ("chunk_state_fwd", "scalar_gate_outputs", "chunk_state_bwd",
              "scalar_gate_gradients", "scalar_gate_value_gradients"),
    "gated-per-key": ("chunk_state_fwd", "key_gate_scores", "key_gate_outputs",
                      "chunk_state_bwd", "key_gate_value_gradients", "key_gate_gradients"),
    "rwkv6": ("chunk_state_fwd", "key_gate_scores", "key_gate_outputs", "chunk_state_bwd",
              "key_gate_value_gradients", "key_gate_gradients"),
    "delta": ("ut_transform_fwd", "chunk_state_fwd", "scalar_gate_outputs",
              "scalar_gate_value_gradients", "chunk_state_bwd", "scalar_gate_gradients",
              "ut_transform_bwd_columns", "ut_transform_bwd_keys"),
}


@pytest.mark.parametrize("family,key_dim,value_dim,dtype,segments,time_",
                         _fused_terms_configs())
def test_fused_terms_kernels_lower(family: str, key_dim: int, value_dim: int, dtype: jnp.dtype,
                                   segments: bool, time_: int) -> None:
  """The ops on GPU through `pallas_kernels.fused_terms`: every kernel of the forward and
  backward pass."""
  fn, args = gpu_lowering.op_gradient(family, key_dim, value_dim, dtype, time_, segments,
                                      dispatch.KernelOptions(platform="gpu"))
  module = h.export_cuda(fn, *args)
  for name in FUSED_TERMS_KERNELS[family]:
    assert name in module, f"kernel {name} not in the lowered module"


def test_triton_kernels_lists_each_kernel_with_its_launch() -> None:
  """`gpu_lowering.triton_kernels`: one entry per kernel, its Triton IR and its own num_warps
  (the per-chunk kernels take `chunk_warps`, the state kernels `num_warps`)."""
  blocks = BlockSizes(block_v=32, block_k=32, num_warps=2, chunk_warps=4)
  fn, args = gpu_lowering.op_gradient("gated", 64, 64, jnp.bfloat16, 80, True,
                                      dispatch.KernelOptions(platform="gpu", block_sizes=blocks))
  kernels = gpu_lowering.triton_kernels(fn, *args)
  assert sorted(k.name for k in kernels) == sorted(FUSED_TERMS_KERNELS["gated"])
  for kernel in kernels:
    assert f"tt.func public @{kernel.name}" in kernel.ttir
    want = blocks.num_warps if kernel.name.startswith("chunk_state") else blocks.chunk_warps
    assert (kernel.num_warps, kernel.num_stages) == (want, blocks.num_stages), kernel.name


@pytest.mark.slow   # needs the `resources` extra (triton); CI step 2 installs it
@pytest.mark.parametrize("family", ["gated", "delta"])
def test_scalar_gate_and_delta_kernels_do_not_spill(family: str) -> None:
  """At the benchmark shape (K = V = 128, bf16, chunk 64) and the default blocks, Triton 3.9
  compiles every kernel of the scalar-gate and delta-rule paths for sm_90 with no register
  spills and within an H100's 227 KiB of shared memory (an estimate of what XLA's Triton
  does; `benchmarks/kernel_resources.py`)."""
  fn, args = gpu_lowering.op_gradient(family, 128, 128, jnp.bfloat16, 128, False,
                                      dispatch.KernelOptions(platform="gpu"))
  for kernel in gpu_lowering.triton_kernels(fn, *args):
    usage = gpu_lowering.triton_resources(kernel)
    assert usage["stack"] == 0, f"{kernel.name} spills: {usage}"
    assert usage["shared"] <= 227 * 1024, f"{kernel.name}: {usage}"
