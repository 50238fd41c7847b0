"""The Pallas kernels (pallas_kernels/) against the reference, and their dispatch.

On CPU every kernel runs in the Pallas interpreter; on a GPU host the GPU kernel
runs natively (the same tests, `KernelOptions.interpret` is only set for a
platform other than the backend's). Compared against impl="reference": outputs,
final state and the gradient of every input.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as h
from jaxlin.ops import delta_pallas, gated_pallas
from pallas_kernels import dispatch
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence import chunk_recurrence
from pallas_kernels.chunk_recurrence import reference as core_reference
from pallas_kernels.dispatch import KernelOptions

G, D = h.G_FAMILY, h.D_FAMILY
PLATFORMS = ("gpu", "tpu")
# Small dims each kernel takes; on GPU two key and two value blocks, so the split state
# kernels and the partial sums over V are exercised.
DIMS = {"gpu": dict(K=32, V=32), "tpu": dict(K=64, V=64)}
BLOCKS = {"gpu": BlockSizes(block_v=16, block_k=16), "tpu": BlockSizes(block_v=64)}


def _options(platform: str) -> KernelOptions:
  interpret = dispatch.backend_platform() != platform
  return KernelOptions(platform=platform, interpret=interpret, block_sizes=BLOCKS[platform])


# --------------------------------------------------------------------------------- the core
@pytest.mark.parametrize("platform", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_w_k", [False, True], ids=["gated", "delta"])
def test_chunk_recurrence_matches_scan(platform: str, with_w_k: bool) -> None:
  """Kernel forward and custom VJP == autodiff of the plain-JAX chunk scan."""
  rows, num, chunk = 2, 3, 16
  key_dim, value_dim = DIMS[platform]["K"], DIMS[platform]["V"]
  keys = jax.random.split(jax.random.key(0), 7)
  normal = lambda i, shape, s=0.3: s * jax.random.normal(keys[i], shape)
  args = (normal(0, (rows, num, chunk, key_dim)), normal(1, (rows, num, chunk, key_dim)),
          jnp.tril(normal(2, (rows, num, chunk, chunk))), normal(3, (rows, num, chunk, value_dim), 1.0),
          normal(4, (rows, num, chunk, key_dim), 0.05) if with_w_k else None,
          jax.nn.sigmoid(normal(5, (rows, num, 1, key_dim), 1.0)),
          normal(6, (rows, key_dim, value_dim), 1.0))
  options = _options(platform)
  kernel = lambda *xs: chunk_recurrence(*xs, platform=platform, blocks=options.block_sizes,
                                        interpret=options.interpret)
  scan = lambda *xs: core_reference.chunk_recurrence(*xs)[::2]
  w_o = jax.random.normal(jax.random.key(1), (rows, num, chunk, value_dim))

  def loss(f):
    def value(*xs):
      o, final = f(*xs)
      return jnp.sum(o * w_o) + jnp.sum(final ** 2)
    return value

  argnums = tuple(i for i, x in enumerate(args) if x is not None)
  got = jax.value_and_grad(loss(kernel), argnums)(*args)
  want = jax.value_and_grad(loss(scan), argnums)(*args)
  for name, a, e in zip(["loss", *[f"grad{i}" for i in argnums]], [got[0], *got[1]],
                        [want[0], *want[1]]):
    h.assert_close(a, e, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name=name)


# ------------------------------------------------------------------------------- the ops
G_CASES = {
    "bla-segments": dict(gate=None, segments=True, initial_state=True),
    # On GPU (as every G case): the in-chunk terms formed in the kernels; the bonus through
    # the queries one token ahead (jaxlin.ops.gated_pallas._fused_terms_with_bonus).
    "scalar-bonus": dict(gate="scalar", bonus=True, initial_state=True),
    "vector-bonus-segments": dict(gate="vector", bonus=True, segments=True, initial_state=True),
    "scalar-segments-strong": dict(gate="scalar", gate_strength="strong", segments=True,
                                   initial_state=True),
    "vector-segments": dict(gate="vector", segments=True, initial_state=True),
    "vector-mixed-strength": dict(gate="vector", gate_strength="mixed", initial_state=True),
}
D_CASES = {
    "deltanet-segments": dict(gate=None, segments=True, initial_state=True),
    "gated-deltanet": dict(gate="scalar", initial_state=True),
    "gated-deltanet-strong-segments": dict(gate="scalar", gate_strength="strong", segments=True),
    "comba-segments": dict(gate="scalar", removal_key=True, removal=True, segments=True,
                           initial_state=True),
}
CASES = [(G, n, c) for n, c in G_CASES.items()] + [(D, n, c) for n, c in D_CASES.items()]
# (family, case, platform) run by the slow step only, to keep the default run inside CI's
# budget: each is close to a case that stays (same kernels, fewer features).
SLOW_CASES = {(G, "vector-mixed-strength", "gpu"), (D, "deltanet-segments", "gpu"),
              (D, "comba-segments", "gpu"),
              (D, "gated-deltanet", "gpu"), (G, "scalar-segments-strong", "tpu"),
              (D, "gated-deltanet-strong-segments", "tpu")}
OP_CASES = [pytest.param(platform, f, n, c, id=f"{f}-{n}-{platform}",
                         marks=(pytest.mark.slow,) if (f, n, platform) in SLOW_CASES else ())
            for f, n, c in CASES for platform in PLATFORMS]


@pytest.mark.parametrize("platform,family,name,case", OP_CASES)
def test_pallas_matches_reference(platform: str, family: str, name: str, case: dict) -> None:
  """o, final state and every gradient; T = 77: odd, two kernel chunks of 64."""
  d = h.make_inputs(family, B=2, T=77, H=2, **DIMS[platform], seed=3, **case)
  got = h.run_with_grads(family, "pallas", d, kernel=_options(platform))
  want = h.run_with_grads(family, "reference", d)
  h.assert_all_close(got, want, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"{platform} {name}")


BF16_CASES = {"G": (G, dict(gate="scalar")), "D": (D, dict(gate="scalar")),
              # RWKV6 on GPU: the bonus is added to the bf16 kernel output (two roundings)
              "G-vector-bonus-segments": (G, dict(gate="vector", bonus=True, segments=True))}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_pallas_bf16_inputs(platform: str, case: str) -> None:
  """bf16 inputs (bf16 matmul operands in the kernel) vs float32 on the same rounded values."""
  family, extra = BF16_CASES[case]
  d = h.make_inputs(family, B=1, T=40, H=2, **DIMS[platform], initial_state=True, seed=5,
                    **extra)
  d16 = {n: (None if x is None else x if n == "segment_ids" else
             np.asarray(jnp.asarray(x, jnp.bfloat16)))
         for n, x in d.items()}
  d16["initial_state"] = d["initial_state"]          # the state is float32 by contract
  rounded = {n: (None if x is None else np.asarray(x, np.float32) if n != "segment_ids" else x)
             for n, x in d16.items()}
  got = h.run_with_grads(family, "pallas", d16, kernel=_options(platform))
  want = h.run_with_grads(family, "reference", rounded)
  assert got["o"].dtype == jnp.bfloat16
  h.assert_all_close(got, want, rtol=h.LOWP_RTOL, atol_rel=h.LOWP_ATOL_REL, ctx=platform)


# ------------------------------------------------------------------------------ dispatch
def test_auto_on_cpu_is_xla_without_warning() -> None:
  d = h.make_inputs(G, B=1, T=20, H=2, K=16, V=16, gate="vector")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    o_auto, s_auto = h.run_op(G, "auto", d)
  o_xla, s_xla = h.run_op(G, "xla", d)
  np.testing.assert_array_equal(o_auto, o_xla)
  np.testing.assert_array_equal(s_auto, s_xla)


@pytest.mark.parametrize("family", [G, D])
def test_pallas_falls_back_to_xla_with_a_warning(family: str) -> None:
  """On CPU without the interpreter, and for dims the kernels reject (K = 48): the XLA answer."""
  d = h.make_inputs(family, B=1, T=20, H=2, K=48, V=16, gate="scalar")
  o_xla, s_xla = h.run_op(family, "xla", d)
  for options in (None, KernelOptions(platform="gpu", interpret=True)):
    with pytest.warns(UserWarning, match="XLA chunked form"):
      o, s = h.op_jit(family, impl="pallas", kernel=options, output_final_state=True)(d)
    np.testing.assert_array_equal(np.asarray(o), o_xla)
    np.testing.assert_array_equal(np.asarray(s), s_xla)


def test_support_predicate() -> None:
  bf16, f32 = jnp.bfloat16, jnp.float32
  for dim in (16, 32, 64, 128, 256):
    assert dispatch.supports_dims("gpu", dim, 64, bf16)
  for dim in (64, 128, 256):
    assert dispatch.supports_dims("tpu", dim, dim, f32)
  assert not dispatch.supports_dims("gpu", 48, 64, bf16)      # not a power of two
  assert not dispatch.supports_dims("gpu", 64, 512, bf16)     # state block too large
  assert not dispatch.supports_dims("tpu", 32, 64, bf16)      # below the 64 TPU tiles
  assert not dispatch.supports_dims("gpu", 64, 64, jnp.int32)
  assert not dispatch.supports_dims("cpu", 64, 64, f32)
  assert [dispatch.kernel_chunk(t) for t in (1, 16, 17, 33, 63, 64, 65, 4096)] == [
      16, 16, 32, 64, 64, 64, 64, 64]


def test_fused_terms_kernels_are_chosen_on_gpu() -> None:
  """`pallas_kernels.fused_terms` takes every G and D call on GPU (the RWKV6 bonus and
  K = 256 included), none on TPU."""
  assert dispatch.uses_fused_terms("gpu", 128)
  assert dispatch.uses_fused_terms("gpu", 256)
  assert not dispatch.uses_fused_terms("tpu", 64)


@pytest.mark.parametrize("family,bonus", [(G, False), (G, True), (D, False)],
                         ids=["G", "G-bonus", "D"])
def test_fused_terms_option_selects_the_generic_path(family: str, bonus: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
  """KernelOptions(fused_terms=False) runs the XLA-terms path on GPU; both give the same
  answer (with the RWKV6 bonus too: the fused path shifts the queries)."""
  extra = dict(bonus=True, gate="vector") if bonus else dict(gate="scalar")
  d = h.make_inputs(family, B=1, T=40, H=2, **DIMS["gpu"], segments=True, initial_state=True,
                    seed=7, **extra)
  fused = _options("gpu")
  module, name = ((gated_pallas, "gated_chunks") if family == G
                  else (delta_pallas, "delta_chunks"))
  calls = []
  real = getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
  run = lambda options: h.op_jit(family, impl="pallas", kernel=options,
                                 output_final_state=True)(d)
  want = run(dataclasses.replace(fused, fused_terms=False))
  assert not calls
  got = run(fused)
  assert calls
  for a, e in zip(got, want):
    h.assert_close(a, e, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="fused_terms option")


@pytest.mark.parametrize("family,gate", [(G, "scalar"), (G, "vector"), (D, "scalar")],
                         ids=["G-scalar", "G-vector", "D-scalar"])
def test_fused_terms_at_the_largest_key_dim(family: str, gate: str) -> None:
  """Calls with K = 256 (four key blocks of the default block_k = 64; for D, two column
  blocks of the UT forward) through the fused GPU kernels with the default BlockSizes,
  against the reference: o, final state, every gradient."""
  d = h.make_inputs(family, B=1, T=40, H=2, K=256, V=32, gate=gate, segments=True,
                    initial_state=True, seed=11)
  options = KernelOptions(platform="gpu", interpret=dispatch.backend_platform() != "gpu")
  got = h.run_with_grads(family, "pallas", d, kernel=options)
  want = h.run_with_grads(family, "reference", d)
  h.assert_all_close(got, want, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL,
                     ctx=f"K=256 {family} {gate}")


def test_block_sizes_are_checked() -> None:
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_v=48).check("gpu", 96)
  with pytest.raises(ValueError, match="multiple of 128"):
    BlockSizes(block_v=64).check("tpu", 256)
  with pytest.raises(ValueError, match="must divide"):
    BlockSizes(block_v=64).check("gpu", 96)
  assert BlockSizes.default("gpu", 256, 128) == BlockSizes(block_v=64, block_k=64, num_warps=8)
  assert BlockSizes.default("gpu", 256, 128, delta=True) == BlockSizes(block_v=32, block_k=64,
                                                                       num_warps=8)
  assert BlockSizes.default("gpu", 128, 128) == BlockSizes(block_v=64, block_k=64, num_warps=4)
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_v=64, block_k=24).check("gpu", 64)
  with pytest.raises(ValueError, match="chunk_warps=6"):
    BlockSizes(block_v=64, chunk_warps=6).check("gpu", 64)
  assert BlockSizes.default("gpu", 128, 128, delta=True).num_warps == 8
  assert BlockSizes.default("tpu", 128, 128).block_v == 128
