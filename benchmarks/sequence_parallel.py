"""Sequence parallelism on 8 fake CPU devices: bytes moved, time and memory vs T.

    python benchmarks/sequence_parallel.py                 # T in 1024 .. 8192, ~10 min on 2 cores
    python benchmarks/sequence_parallel.py --T 512 1024 --runs 1   # a smoke run

One recurrence (the delta family with a scalar gate: Gated DeltaNet's op; B=1, H=4, K=V=64,
float32, chunk 64) with its sequence split 8 ways, forward + backward, four ways:

* lasp2          `jaxlin.ops.lasp2`: ONE all_gather of every span's (M, N) (M is K x K
                 for the delta family), a fold, the op per span;
* lasp2_scan     the same with the "ppermute_scan" collective (log2(P) ppermute rounds);
* ring           LASP-1's pattern (registered here as a collective): the state passes from
                 span to span, one ppermute hop per shard, P - 1 rounds in sequence;
* allgather_kv   no state exchange: every span all-gathers k, v, g, beta of the whole sequence
                 and runs the op over it from the start (what XLA's partitioner does to a scan
                 over a split axis), keeping its own outputs.

For each: the bytes of every collective in the compiled HLO (result shapes; per device, per
step), the step time (median of --runs, after a warm-up), and XLA's per-device temporaries
(`memory_analysis()`). And lasp2's temporaries vs the shard count at T = 4096 (1, 2, 4, 8).
Writes benchmarks/results/sequence_parallel.json and .png. CPU numbers: the bytes are exact
for these shapes; time and memory are XLA:CPU's (a TPU / GPU fuses differently).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from jaxlin import parallel  # noqa: E402
from jaxlin.ops import lasp2  # noqa: E402
from jaxlin.ops.families import FAMILIES  # noqa: E402
from jaxlin.ops.span import SpanSummary  # noqa: E402
from jaxlin.parallel import sharding  # noqa: E402

matplotlib.use("Agg")
B, H, K, V, CHUNK, SHARDS = 1, 4, 64, 64, 64, 8
COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter", "all-to-all")
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "u32": 4}
FAMILY = FAMILIES["delta"]


def ring_states(summary: SpanSummary, initial_state: jax.Array | None, axis: tuple[str, ...],
                segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """LASP-1: P - 1 rounds; in round j span j's end state (M_j S_in^j + N_j) hops to span j + 1.
  (No documents: the benchmark's rows are one document.)"""
  del segment_ids
  shards = math.prod(sharding.active_mesh().shape[a] for a in axis)
  here = jax.lax.axis_index(axis)
  state = (jnp.zeros(summary.state.shape, jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  incoming = state
  for j in range(shards - 1):
    sent = jax.lax.ppermute(summary.apply(incoming), axis, perm=[(j, j + 1)])
    incoming = jnp.where(here == j + 1, sent, incoming)
  final = jax.lax.psum(jnp.where(here == shards - 1, summary.apply(incoming), 0.0), axis)
  return incoming, final


lasp2.COLLECTIVES["ring"] = ring_states


def allgather_kv(q: jax.Array, k: jax.Array, v: jax.Array, inputs: dict[str, jax.Array]
                 ) -> jax.Array:
  """Every span gathers k, v and the per-token inputs and runs the op from the start."""
  mesh = sharding.active_mesh()
  tokens = PartitionSpec(None, "sequence")

  def body(q, k, v, inputs):
    gather = lambda a: jax.lax.all_gather(a, "sequence", axis=1, tiled=True)
    span = q.shape[1]
    here = jax.lax.axis_index("sequence")
    full_q = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(gather(k)), q, here * span, 1)
    o, _ = FAMILY.op(full_q, gather(k), gather(v), **{n: gather(a) for n, a in inputs.items()},
                     chunk_size=CHUNK, impl="xla")
    return jax.lax.dynamic_slice_in_dim(o, here * span, span, 1)

  return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens,
                                                  {n: tokens for n in inputs}),
                       out_specs=tokens, check_vma=False)(q, k, v, inputs)


def inputs(time_len: int) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  k = normal(B, time_len, H, K)
  return {"q": normal(B, time_len, H, K), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
          "v": normal(B, time_len, H, V),
          "inputs": {"beta": jax.nn.sigmoid(normal(B, time_len, H)),
                     "g": -0.1 * jnp.abs(normal(B, time_len, H))}}


def loss_fn(method: str) -> Callable[[dict[str, Any]], jax.Array]:
  def loss(x: dict[str, Any]) -> jax.Array:
    if method == "allgather_kv":
      o = allgather_kv(x["q"], x["k"], x["v"], x["inputs"])
    else:
      o, _ = lasp2.sequence_op(FAMILY, x["q"], x["k"], x["v"], x["inputs"], {}, scale=None,
                               segment_ids=None, initial_state=None, output_final_state=False,
                               chunk_size=CHUNK, impl="xla")
    return jnp.sum(o * o)
  return loss


def moves_data(line: str) -> bool:
  """False for a collective over one-device groups (replica_groups={{0},{1},..}: shard_map's
  transpose emits such no-op all-reduces over the mesh axes of size 1)."""
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)   # [groups, size]<=[devices]
  if iota:
    return int(iota.group(2)) > 1
  groups = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  return groups is None or any("," in g for g in re.findall(r"\{([\d,]*)\}", groups.group(1)))


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of the results of the collectives that move data (per device, per step)."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo.splitlines():
    for kind in COLLECTIVES:
      if re.search(rf"\b{kind}(-start)?\(", line) and "=" in line and moves_data(line):
        lhs = line.split("=", 1)[1].split(kind)[0]
        out[kind] += sum(math.prod(int(d) for d in dims.split(",") if d) * BYTES.get(t, 4)
                         for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", lhs))
  return out


def measure(method: str, time_len: int, shards: int, runs: int) -> dict[str, Any]:
  devices = jax.devices()[:shards]
  mesh = parallel.make_mesh({"data": 1, "sequence": shards}, devices)
  collective = {"lasp2": "all_gather", "lasp2_scan": "ppermute_scan"}.get(method, "ring")
  # every [B, T, ...] input (and its gradient) lives split over the sequence, as in a model
  spans = jax.sharding.NamedSharding(mesh, PartitionSpec(None, "sequence"))
  x = jax.device_put(inputs(time_len), spans)
  with sharding.activations_on(mesh, options={"sequence_collective": collective}):
    step = jax.jit(jax.grad(loss_fn(method)), in_shardings=(spans,), out_shardings=spans)
    compiled = step.lower(x).compile()
  memory = compiled.memory_analysis()
  moved = collective_bytes(compiled.as_text())
  jax.block_until_ready(compiled(x))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x))
    times.append(time.perf_counter() - start)
  return {"method": method, "T": time_len, "shards": shards,
          "bytes": moved, "total_bytes": sum(moved.values()),
          "temporaries_bytes": int(memory.temp_size_in_bytes),
          "seconds": float(np.median(times))}


def plot(rows: list[dict[str, Any]], path: str) -> None:
  figure = Figure(figsize=(13, 3.8))
  FigureCanvasAgg(figure)
  panels = [("total_bytes", "bytes moved per device per step"), ("seconds", "step time (s)"),
            ("temporaries_bytes", "per-device temporaries (bytes)")]
  for i, (key, label) in enumerate(panels):
    ax = figure.add_subplot(1, 3, i + 1)
    for method in ("lasp2", "lasp2_scan", "ring", "allgather_kv"):
      pts = sorted((r["T"], r[key]) for r in rows if r["method"] == method
                   and r["shards"] == SHARDS)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  figure.axes[0].legend(fontsize=8)
  figure.suptitle(f"Gated DeltaNet op, fwd+bwd, B={B} H={H} K=V={K}, {SHARDS} fake CPU devices",
                  fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--T", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                    "sequence_parallel"))
  args = parser.parse_args()
  rows = []
  for time_len in args.T:
    for method in ("lasp2", "lasp2_scan", "ring", "allgather_kv"):
      row = measure(method, time_len, SHARDS, args.runs)
      rows.append(row)
      print(f"T={time_len:6d} {method:13s} moved {row['total_bytes'] / 2**20:8.3f} MiB  "
            f"temporaries {row['temporaries_bytes'] / 2**20:8.1f} MiB  "
            f"{row['seconds'] * 1e3:8.1f} ms", flush=True)
  fixed = max(t for t in args.T if t <= 4096) if min(args.T) <= 4096 else min(args.T)
  for shards in (1, 2, 4):
    row = measure("lasp2", fixed, shards, args.runs)
    rows.append(row)
    print(f"T={fixed:6d} lasp2 on {shards} shards: temporaries "
          f"{row['temporaries_bytes'] / 2**20:8.1f} MiB", flush=True)
  result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "jax": jax.__version__},
            "shape": {"B": B, "H": H, "K": K, "V": V, "chunk": CHUNK, "dtype": "float32"},
            "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  plot(rows, args.out + ".png")
  print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
  main()
