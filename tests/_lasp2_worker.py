"""The multi-device checks of tests/test_lasp2.py, in a fresh interpreter with 8 fake CPU
devices (XLA_FLAGS is set here, before jax starts). Prints one JSON object of measurements;
the test asserts on them.

    python tests/_lasp2_worker.py

For every case (a family with its gate kind) and every mesh (sequence 2, 4, 8; data 2 x
sequence 4): the relative max difference between `lasp2.sequence_op` and the one-device op of
the outputs, the final state and the gradient of every input (q, k, v, the per-token inputs,
the head inputs and the initial state), on batch 2 with packed documents (row 0: a document
ending exactly at the middle, one spanning the rest; row 1: one document per eighth, the last
eighth padding) and an initial state. Also the all-gathers of the compiled forward and their
bytes at two lengths.

The "ppermute_scan" collective (log-depth prefix scan) on the same packed batch, 2 and 8 shards;
the GPU Pallas kernels (interpreter, K = V = 16) as each span's op on sequence 4.

Layers ("layers"): every linear variant (HGRN2 also with its short conv), MoM over GLA and
Gated DeltaNet, softmax attention (plain, sliding window, GQA) and Liger Attention (GLA +
a window, GQA) on the packed batch, one
device against sequence 2, 4, 8: y and the gradients of x and of every parameter; a causality
probe (token T/2, a shard boundary, changed: no earlier output moves) and the collectives of a
Gated DeltaNet layer's compiled forward (one all-gather, the conv halo's collective-permute).
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax import nnx  # noqa: E402

from jaxlin import parallel  # noqa: E402
from jaxlin.layers import MixtureOfMemories  # noqa: E402
from jaxlin.layers.attention import SoftmaxAttention  # noqa: E402
from jaxlin.layers.liger import LigerAttention  # noqa: E402
from jaxlin.layers.linear_attention import VARIANTS, LinearAttention  # noqa: E402
from jaxlin.ops.families import FAMILIES  # noqa: E402
from jaxlin.ops import lasp2  # noqa: E402
from pallas_kernels.dispatch import KernelOptions  # noqa: E402

B, T, H, K, V = 2, 32, 2, 8, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}   # tiny shapes: compile time dominates
CHUNK = 16
# case -> (family, per-token input shapes ("h": [B, T, H], "hk": [B, T, H, K]), head inputs)
CASES: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
    "gated_none": ("gated", {}, ()),
    "gated_scalar": ("gated", {"g": "h"}, ()),
    "gated_per_key": ("gated", {"g": "hk"}, ()),
    "gated_bonus": ("gated", {"g": "hk"}, ("bonus",)),
    "delta": ("delta", {"beta": "h"}, ()),
    "delta_gated": ("delta", {"beta": "h", "g": "h"}, ()),
    "delta_removal": ("delta", {"beta": "h", "g": "h", "removal": "h"}, ()),
}
MESHES = {"sequence2": dict(sequence=2), "sequence4": dict(sequence=4),
          "sequence8": dict(sequence=8), "data2_sequence4": dict(data=2, sequence=4)}


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
  shape = tuple(sizes.get(a, 1) for a in parallel.AXES)
  return jax.make_mesh(shape, parallel.AXES, devices=jax.devices()[:int(np.prod(shape))],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def inputs(case: str, time: int = T, decay: str = "normal", dims: tuple[int, int] = (K, V)
           ) -> dict[str, Any]:
  """Random inputs of one case: q, k, v, per-token inputs, head inputs, initial state."""
  family, token_inputs, head_inputs = CASES[case]
  K, V = dims
  rng = np.random.default_rng(len(case))
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = normal(B, time, H, K)
  if family == "delta":
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  out = {"q": normal(B, time, H, K), "k": k, "v": normal(B, time, H, V), "inputs": {},
         "head_inputs": {}, "initial_state": normal(B, H, K, V)}
  for name, kind in token_inputs.items():
    shape = (B, time, H) + ((K,) if kind == "hk" else ())
    if name == "g":
      low = {"normal": 0.5, "none": 30.0, "full": 1e-6}[decay]
      value = -low * jnp.asarray(rng.uniform(0.2, 1.0, size=shape), jnp.float32)
    else:   # beta, removal in (0, 1)
      value = jax.nn.sigmoid(normal(*shape))
    out["inputs"][name] = value
  for name in head_inputs:
    out["head_inputs"][name] = 0.5 * normal(H, K)
  return out


def segment_ids(time: int = T) -> jnp.ndarray:
  """Row 0: [0, T/2) one document, [T/2, T) another (ends exactly at a shard boundary, spans
  several shards); row 1: one document per eighth, the last eighth padding (id 0)."""
  t = np.arange(time)
  row0 = np.where(t < time // 2, 1, 2)
  row1 = t // (time // 8) + 1
  row1[t >= 7 * time // 8] = 0
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


def run(case: str, x: dict[str, Any], seg: jnp.ndarray | None, mesh: Any,
        collective: str = "all_gather", impl: str = "xla", kernel: Any = None) -> Any:
  """(o, final, gradients of every input) of the op, on `mesh` (LASP-2) or one device (None)."""
  family = FAMILIES[CASES[case][0]]
  rng = np.random.default_rng(7)
  w_o = jnp.asarray(rng.normal(size=x["v"].shape), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=x["initial_state"].shape), jnp.float32)

  def loss(x):
    o, final = lasp2.sequence_op(family, x["q"], x["k"], x["v"], x["inputs"], x["head_inputs"],
                                 scale=None, segment_ids=seg, initial_state=x["initial_state"],
                                 output_final_state=True, chunk_size=CHUNK, impl=impl,
                                 kernel=kernel)
    return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
  if mesh is None:
    (_, (o, final)), grads = fn(x)
  else:
    with parallel.activations_on(mesh, options={"sequence_collective": collective}):
      (_, (o, final)), grads = fn(x)
  return jax.tree.map(np.asarray, (o, final, grads))


def relative(a: Any, b: Any) -> float:
  """max |a - b| / max |b| over matching trees."""
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
  return diff / max(scale, 1e-30)


def compare(case: str, mesh_name: str, decay: str = "normal", packed: bool = True,
            collective: str = "all_gather", kernel: Any = None) -> dict:
  x = inputs(case, decay=decay, dims=(16, 16) if kernel else (K, V))
  seg = segment_ids() if packed else None
  want = run(case, x, seg, None)
  got = run(case, x, seg, make_mesh(MESHES[mesh_name]), collective,
            impl="xla" if kernel is None else "pallas", kernel=kernel)
  finite = all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(got))
  return {"o": relative(got[0], want[0]), "final": relative(got[1], want[1]),
          "grads": {name: relative(got[2][name], want[2][name]) for name in want[2]
                    if jax.tree.leaves(want[2][name])},
          "finite": finite}


def all_gathers(case: str, time: int, packed: bool) -> dict[str, Any]:
  """The all-gathers of the compiled LASP-2 forward on sequence 4, with their result bytes."""
  family = FAMILIES[CASES[case][0]]
  x = inputs(case, time)
  seg = segment_ids(time) if packed else None

  def forward(x):
    return lasp2.sequence_op(family, x["q"], x["k"], x["v"], x["inputs"], x["head_inputs"],
                             scale=None, segment_ids=seg, initial_state=x["initial_state"],
                             output_final_state=True, chunk_size=CHUNK, impl="xla")

  with parallel.activations_on(make_mesh(MESHES["sequence4"])):
    hlo = jax.jit(forward).lower(x).compile().as_text()
  lines = [line for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]
  sizes = []
  for line in lines:
    lhs = line.split("=", 1)[1].split("all-gather")[0]
    sizes.append(sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * 4
                     for _, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", lhs)))
  return {"count": len(lines), "bytes": sizes}


D = 32
LAYERS: dict[str, Any] = {
    **{name: (lambda name=name: LinearAttention(D, H, variant=name, chunk_size=CHUNK,
                                                rngs=nnx.Rngs(0))) for name in VARIANTS},
    "hgrn2+conv": lambda: LinearAttention(D, H, variant="hgrn2", use_short_conv=True,
                                          chunk_size=CHUNK, rngs=nnx.Rngs(0)),
    "mom-gla": lambda: MixtureOfMemories(D, H, core="gla", chunk_size=CHUNK, rngs=nnx.Rngs(0)),
    "mom-gated_deltanet": lambda: MixtureOfMemories(D, H, core="gated_deltanet",
                                                    chunk_size=CHUNK, rngs=nnx.Rngs(0)),
    "softmax": lambda: SoftmaxAttention(D, 4, num_kv_heads=2, rngs=nnx.Rngs(0)),
    "softmax_window": lambda: SoftmaxAttention(D, 4, window=5, rngs=nnx.Rngs(0)),
    "liger_attention": lambda: LigerAttention(D, 4, num_kv_heads=2, liger_window=5,
                                              chunk_size=CHUNK, rngs=nnx.Rngs(0)),
}


def perturbed(layer: nnx.Module) -> nnx.Module:
  """Every parameter + 0.1 N(0, 1): zero-initialised parts matter."""
  params = nnx.state(layer, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(layer, jax.tree.unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
  return layer


def layer_run(layer: nnx.Module, x: jnp.ndarray, seg: jnp.ndarray | None, mesh: Any) -> Any:
  """(y, gradients of x and of every parameter) of sum(y * w), on `mesh` or one device."""
  graph, params, rest = nnx.split(layer, nnx.Param, ...)
  w = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def loss(params, x):
    y = nnx.merge(graph, params, rest)(x, segment_ids=seg).y
    return jnp.sum(y * w), y

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
               compiler_options=FAST_COMPILE)
  if mesh is None:
    (_, y), grads = fn(params, x)
  else:
    with parallel.activations_on(mesh):
      (_, y), grads = fn(params, x)
  return jax.tree.map(np.asarray, (y, grads))


def compare_layer(name: str) -> dict[str, Any]:
  layer = perturbed(LAYERS[name]())
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, D)), jnp.float32)
  seg = segment_ids()
  want = layer_run(layer, x, seg, None)
  out = {}
  for mesh_name in ("sequence2", "sequence4", "sequence8"):
    got = layer_run(layer, x, seg, make_mesh(MESHES[mesh_name]))
    out[mesh_name] = {"y": relative(got[0], want[0]), "dx": relative(got[1][1], want[1][1]),
                      "dparams": relative(got[1][0], want[1][0])}
  return out


def causality(name: str) -> float:
  """max |y_t| change for t < T/2 when token T/2 (the start of span 2 of 4) changes."""
  layer = perturbed(LAYERS[name]())
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, D)), jnp.float32)
  changed = x.at[:, T // 2].add(1.0)
  with parallel.activations_on(make_mesh(MESHES["sequence4"])):
    run = jax.jit(lambda x: layer(x).y)
    before, after = run(x), run(changed)
  moved_later = float(jnp.max(jnp.abs(after[:, T // 2:] - before[:, T // 2:])))
  assert moved_later > 0, name   # the probe reaches the layer
  return float(jnp.max(jnp.abs(after[:, :T // 2] - before[:, :T // 2])))


def layer_collectives(name: str) -> dict[str, int]:
  layer = LAYERS[name]()
  x = jnp.zeros((B, T, D), jnp.float32)
  with parallel.activations_on(make_mesh(MESHES["sequence4"])):
    hlo = jax.jit(lambda x: layer(x).y).lower(x).compile().as_text()
  count = lambda op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
  return {op: count(op) for op in ("all-gather", "collective-permute", "all-reduce",
                                   "all-to-all", "reduce-scatter")}


def main() -> None:
  results: dict[str, Any] = {"compare": {}, "extreme": {}, "unpacked": {}}
  for case in CASES:
    for mesh_name in MESHES:
      results["compare"][f"{case}/{mesh_name}"] = compare(case, mesh_name)
  for case in ("gated_per_key", "delta_gated"):
    for decay in ("none", "full"):
      results["extreme"][f"{case}/{decay}"] = compare(case, "sequence8", decay=decay)
    results["unpacked"][case] = compare(case, "sequence4", packed=False)
  # the GPU kernels (Pallas interpreter) run each span inside shard_map
  interpreted = KernelOptions(platform="gpu", interpret=True)
  results["pallas"] = {case: compare(case, "sequence4", kernel=interpreted)
                       for case in ("gated_per_key", "delta_gated")}
  results["ppermute_scan"] = {f"{case}/{mesh_name}": compare(case, mesh_name,
                                                             collective="ppermute_scan")
                              for case in ("gated_bonus", "delta_removal")
                              for mesh_name in ("sequence2", "sequence8", "data2_sequence4")}
  results["all_gathers"] = {
      f"{case}/T{time}/{'packed' if packed else 'unpacked'}": all_gathers(case, time, packed)
      for case in ("gated_per_key", "delta_gated") for time in (1024, 8192)
      for packed in (False, True)}
  results["layers"] = {name: compare_layer(name) for name in LAYERS}
  results["causality"] = {name: causality(name)
                          for name in ("gla", "gated_deltanet", "mom-gated_deltanet", "softmax")}
  results["layer_collectives"] = {name: layer_collectives(name)
                                  for name in ("gated_deltanet", "gla", "softmax")}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
