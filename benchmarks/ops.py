"""Benchmark the jaxlin recurrence ops against softmax attention on the local device.

Usage:
  python benchmarks/ops.py                 # T in 1024 4096 16384: benchmarks/results/ops.json + .png
  python benchmarks/ops.py --plot-only     # redraw ops.png from ops.json
  python benchmarks/ops.py --quick         # smoke run, about a minute on 2 CPU cores
  python benchmarks/ops.py --T 2048 8192 --out /tmp/ops.json

What is measured (B=1, H=4, K=V=64, float32 unless changed by flags):

* Time. Each case is jitted and compiled ahead of time, called once to warm up, then timed over
  several runs (--min-runs, and at least --min-total-s seconds; only 3 runs where one call takes
  over 2 s) with `block_until_ready`; the median is reported. Two passes per case:
  `forward` = the op itself, `forward+backward` = `jax.grad(lambda *x: op(*x).sum())` with respect
  to every array input (q, k, v, and g, beta where present).

  Cases: the G family `gated_linear_attention` with no gate, a scalar gate g [B,T,H] and a vector
  gate g [B,T,H,K]; the D family `delta_rule` as DeltaNet (g=None) and Gated DeltaNet (scalar g);
  each with impl "reference" (token-by-token scan; only up to --max-reference-T) and "xla"
  (chunked). Baseline: causal `jax.nn.dot_product_attention(implementation="xla")`.

* Model FLOP rate. A linear recurrence with state S in R^{K x V} evaluated in chunks of C = 64
  costs, per token and head, forward:

      F_lin = 4 K V + 2 C (K + V)

  (2KV to read the state into o, 2KV to write k v^T into it, 2C(K+V) for the in-chunk q k^T
  scores and their product with v). Causal softmax attention at length T costs, per token and head
  on average, F_att = (K + V) T (2K per q.k pair and 2V per p.v pair over T/2 visible pairs).
  Forward+backward counts 3x forward. "model GFLOP/s" = B T H F / time: the same count for every
  impl, so it compares implementations, not how many FLOPs each actually executes.

* Reference rate. The rate of a jitted batched matmul einsum("bij,bjk->bik") over 1024 float32
  64x64 matrices (2 * 64^3 * 1024 FLOPs), the building block of the chunked form. Every row is
  also reported as a ratio to it.

* Memory. For the xla impl of each case (and the attention baseline), the forward+backward
  function is compiled (never run) at T in --memory-T and `compiled.memory_analysis()` is read:
  bytes = temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes, and the ratio
  bytes(T) / bytes(T_first). Linear recurrences grow linearly in T; attention quadratically.

Nothing is downloaded. Results are printed as tables and written as JSON (with the jax version,
platform, device kind and date). Cases whose compiled forward+backward would not fit in the
device's memory are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

import jaxlin
import jaxlin.ops
from jaxlin.evals import timing as timing_lib
from jaxlin.evals.timing import compiled_memory, device_memory_budget_bytes, median_seconds

CHUNK = 64  # chunk length C of the FLOP model (and of the xla impl's default)
BMM_BATCH = 1024
BMM_SIZE = 64
# Run a case only if its compiled fwd+bwd needs less than this fraction of memory. The compiled
# estimate undercounts the CPU runtime: softmax attention at T=16384 (12.4 GiB estimated) was
# killed for memory on a 23 GiB machine at 0.8.
MEMORY_FRACTION_ALLOWED = 0.4
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "ops.json"

Inputs = dict[str, jax.Array]
OpFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Shape:
  """Benchmark problem size; layout [B, T, H, D]."""
  batch: int
  time: int
  heads: int
  key_dim: int
  value_dim: int
  dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked function: `make_inputs(shape)` -> arrays, `op(**arrays)` -> output."""
  family: str
  name: str
  impl: str
  make_inputs: Callable[[Shape], Inputs]
  op: OpFn
  flops_per_token_head: Callable[[Shape], float]


# ------------------------------------------------------------------------------------------------
# Inputs and cases


def _qkv(shape: Shape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Random q, k, v [B,T,H,*] and a spare key for gates."""
  kq, kk, kv, rest = jax.random.split(jax.random.key(seed), 4)
  b, t, h = shape.batch, shape.time, shape.heads
  q = jax.random.normal(kq, (b, t, h, shape.key_dim), shape.dtype)
  k = jax.random.normal(kk, (b, t, h, shape.key_dim), shape.dtype)
  v = jax.random.normal(kv, (b, t, h, shape.value_dim), shape.dtype)
  return q, k, v, rest


def _log_gate(key: jax.Array, gate_shape: tuple[int, ...]) -> jax.Array:
  """A GLA-style log-space gate, logsigmoid(x) / 16 <= 0, in float32."""
  return jax.nn.log_sigmoid(jax.random.normal(key, gate_shape, jnp.float32)) / 16


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# Per-key gates drawn uniformly from these ranges land in score tier 1 / 2 of
# jaxlin.ops.gated (span <= 60 per 16-token sub-chunk / beyond it); "vector" is tier 0.
TIER_GATE_RANGES = {"vector-tier1": (-3.7, -2.1), "vector-tier2": (-30.0, -5.0)}


def gla_inputs(gate: str) -> Callable[[Shape], Inputs]:
  """Inputs of gated_linear_attention, gate in {"none", "scalar", "vector"} or TIER_GATE_RANGES."""

  def make(shape: Shape) -> Inputs:
    q, k, v, key = _qkv(shape)
    inputs = {"q": q, "k": k, "v": v}
    bth = (shape.batch, shape.time, shape.heads)
    if gate == "scalar":
      inputs["g"] = _log_gate(key, bth)
    elif gate == "vector":
      inputs["g"] = _log_gate(key, bth + (shape.key_dim,))
    elif gate in TIER_GATE_RANGES:
      low, high = TIER_GATE_RANGES[gate]
      inputs["g"] = jax.random.uniform(key, bth + (shape.key_dim,), jnp.float32, low, high)
    return inputs

  return make


def delta_inputs(gated: bool) -> Callable[[Shape], Inputs]:
  """Inputs of delta_rule: L2-normalised q and k (as DeltaNet layers do), beta, optional g."""

  def make(shape: Shape) -> Inputs:
    q, k, v, key = _qkv(shape)
    key_beta, key_gate = jax.random.split(key)
    bth = (shape.batch, shape.time, shape.heads)
    inputs = {"q": _l2_normalize(q), "k": _l2_normalize(k), "v": v,
              "beta": jax.nn.sigmoid(jax.random.normal(key_beta, bth, jnp.float32))}
    if gated:
      inputs["g"] = _log_gate(key_gate, bth)
    return inputs

  return make


def attention_inputs(shape: Shape) -> Inputs:
  q, k, v, _ = _qkv(shape)
  return {"q": q, "k": k, "v": v}


def linear_flops(shape: Shape) -> float:
  """Forward FLOPs per token and head of a chunked linear recurrence: 4KV + 2C(K+V)."""
  k, v = shape.key_dim, shape.value_dim
  return 4 * k * v + 2 * CHUNK * (k + v)


def attention_flops(shape: Shape) -> float:
  """Forward FLOPs per token and head of causal softmax attention, averaged: (K+V) T."""
  return (shape.key_dim + shape.value_dim) * shape.time


def gla_op(impl: str) -> OpFn:
  def op(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None = None) -> jax.Array:
    return jaxlin.ops.gated_linear_attention(q, k, v, g, impl=impl)[0]
  return op


def delta_op(impl: str) -> OpFn:
  def op(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
         g: jax.Array | None = None) -> jax.Array:
    return jaxlin.ops.delta_rule(q, k, v, beta, g, impl=impl)[0]
  return op


def attention_op(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def all_cases(impls: Sequence[str], families: Sequence[str],
              gate_tiers: bool = False) -> list[Case]:
  """The benchmarked cases of the given families ("G", "D", "attn") in table order.

  With `gate_tiers`, per-key gates strong enough for score tiers 1 and 2 are added.
  """
  cases = []
  gates = ("none", "scalar", "vector") + (tuple(TIER_GATE_RANGES) if gate_tiers else ())
  for impl in impls:
    for gate in gates:
      cases.append(Case("G", f"gla gate={gate}", impl, gla_inputs(gate), gla_op(impl),
                        linear_flops))
    cases.append(Case("D", "deltanet", impl, delta_inputs(False), delta_op(impl), linear_flops))
    cases.append(Case("D", "gated deltanet", impl, delta_inputs(True), delta_op(impl),
                      linear_flops))
  cases.append(Case("attn", "softmax causal", "xla", attention_inputs, attention_op,
                    attention_flops))
  return [case for case in cases if case.family in families]


# ------------------------------------------------------------------------------------------------
# Timing and memory


def forward_fn(case: Case) -> Callable[[Inputs], jax.Array]:
  return lambda inputs: case.op(**inputs)


def forward_backward_fn(case: Case) -> Callable[[Inputs], Inputs]:
  """Gradient of sum(output) with respect to every input array."""
  return jax.grad(lambda inputs: jnp.sum(case.op(**inputs).astype(jnp.float32)))


def batched_matmul_gflops(*, min_runs: int, max_runs: int, min_total_s: float) -> float:
  """GFLOP/s of a jitted einsum over BMM_BATCH float32 BMM_SIZE^3 matmuls."""
  ka, kb = jax.random.split(jax.random.key(1))
  n = BMM_SIZE
  a = jax.random.normal(ka, (BMM_BATCH, n, n), jnp.float32)
  b = jax.random.normal(kb, (BMM_BATCH, n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y))
  seconds = median_seconds(matmul, a, b, min_runs=min_runs, max_runs=max_runs,
                           min_total_s=min_total_s)
  return 2 * n**3 * BMM_BATCH / seconds / 1e9


@dataclasses.dataclass
class TimingRow:
  family: str
  name: str
  impl: str
  T: int
  pass_name: str
  ms: float | None = None
  model_gflops: float | None = None
  ratio_to_bmm: float | None = None
  skipped: str | None = None


@dataclasses.dataclass
class MemoryRow:
  family: str
  name: str
  T: int
  bytes: int | None
  ratio_to_first_T: float | None
  fields: dict[str, int]


def time_case(case: Case, shape: Shape, bmm_gflops: float, args: argparse.Namespace,
              memory_budget: int | None) -> list[TimingRow]:
  """Forward and forward+backward rows of one case at one T (or skipped rows with a reason)."""
  rows = [TimingRow(case.family, case.name, case.impl, shape.time, p)
          for p in ("forward", "forward+backward")]
  if case.impl == "reference" and shape.time > args.max_reference_T:
    reason = (f"reference is a token-by-token scan; only T <= {args.max_reference_T} "
              "(--max-reference-T)")
    for row in rows:
      row.skipped = reason
    return rows
  inputs = case.make_inputs(shape)
  compiled_backward = jax.jit(forward_backward_fn(case)).lower(inputs).compile()
  needed, _ = compiled_memory(compiled_backward)
  if needed is not None and memory_budget is not None and (
      needed > MEMORY_FRACTION_ALLOWED * memory_budget):
    reason = (f"compiled fwd+bwd needs {needed / 2**30:.1f} GiB > "
              f"{MEMORY_FRACTION_ALLOWED:.0%} of {memory_budget / 2**30:.1f} GiB")
    for row in rows:
      row.skipped = reason
    return rows
  compiled_forward = jax.jit(forward_fn(case)).lower(inputs).compile()
  flops_forward = shape.batch * shape.time * shape.heads * case.flops_per_token_head(shape)
  for row, compiled, flops in ((rows[0], compiled_forward, flops_forward),
                               (rows[1], compiled_backward, 3 * flops_forward)):
    seconds = median_seconds(compiled, inputs, min_runs=args.min_runs, max_runs=args.max_runs,
                             min_total_s=args.min_total_s)
    row.ms = seconds * 1e3
    row.model_gflops = flops / seconds / 1e9
    row.ratio_to_bmm = row.model_gflops / bmm_gflops
  return rows


def memory_rows(case: Case, shape_at: Callable[[int], Shape],
                time_lengths: Sequence[int]) -> list[MemoryRow]:
  """Compiled (not run) fwd+bwd memory of one case over T."""
  rows: list[MemoryRow] = []
  for t in time_lengths:
    shape = shape_at(t)
    inputs = jax.eval_shape(lambda: case.make_inputs(shape))  # abstract: nothing is allocated
    compiled = jax.jit(forward_backward_fn(case)).lower(inputs).compile()
    needed, fields = compiled_memory(compiled)
    first = rows[0].bytes if rows else needed
    ratio = needed / first if needed is not None and first else None
    rows.append(MemoryRow(case.family, case.name, t, needed, ratio, fields))
  return rows


# ------------------------------------------------------------------------------------------------
# Output


def format_timing_table(rows: Sequence[TimingRow]) -> str:
  header = (f"{'family':6} {'case':16} {'impl':9} {'T':>6} {'pass':16} {'ms':>10} "
            f"{'model GFLOP/s':>13} {'/ bmm':>7}")
  lines = [header, "-" * len(header)]
  for r in rows:
    prefix = f"{r.family:6} {r.name:16} {r.impl:9} {r.T:>6} {r.pass_name:16} "
    if r.skipped:
      lines.append(prefix + f"skipped ({r.skipped})")
    else:
      lines.append(prefix + f"{r.ms:>10.2f} {r.model_gflops:>13.2f} {r.ratio_to_bmm:>7.3f}")
  return "\n".join(lines)


def format_memory_table(rows: Sequence[MemoryRow]) -> str:
  header = f"{'family':6} {'case':16} {'T':>6} {'fwd+bwd MiB':>12} {'/ first T':>10}"
  lines = [header, "-" * len(header)]
  for r in rows:
    mib = f"{r.bytes / 2**20:>12.1f}" if r.bytes is not None else f"{'n/a':>12}"
    ratio = f"{r.ratio_to_first_T:>10.2f}" if r.ratio_to_first_T is not None else f"{'n/a':>10}"
    lines.append(f"{r.family:6} {r.name:16} {r.T:>6} {mib} {ratio}")
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "jaxlib": _jaxlib_version(),
      "jaxlin": getattr(jaxlin, "__version__", None),
      "python": platform.python_version(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "host": platform.machine(),
      "cpu_count": os.cpu_count(),
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


# ------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--T", type=int, nargs="+", default=None,
                      help="sequence lengths to time (default 1024 4096 16384; --quick: 256)")
  parser.add_argument("--memory-T", type=int, nargs="+", default=None,
                      help="lengths for compiled memory (default 4096 16384 65536; "
                           "--quick: 1024 4096)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help="JSON output path (default benchmarks/results/ops.json)")
  parser.add_argument("--quick", action="store_true", help="fast smoke run")
  parser.add_argument("--plot-only", action="store_true",
                      help="only redraw the PNG (--out with .png) from the JSON at --out")
  parser.add_argument("--impls", nargs="+", default=["reference", "xla"],
                      choices=["reference", "xla", "pallas", "auto"])
  parser.add_argument("--gate-tiers", action="store_true",
                      help="also time per-key gates in score tiers 1 and 2 (strong decays)")
  parser.add_argument("--families", nargs="+", default=["G", "D", "attn"],
                      choices=["G", "D", "attn"], help="which cases to run (default all)")
  parser.add_argument("--max-reference-T", type=int, default=4096,
                      help="skip impl=reference above this T (it is a token-by-token scan)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--key-dim", type=int, default=64)
  parser.add_argument("--value-dim", type=int, default=64)
  parser.add_argument("--min-runs", type=int, default=None, help="timed runs at least (5; quick 2)")
  parser.add_argument("--max-runs", type=int, default=20, help="timed runs at most")
  parser.add_argument("--min-total-s", type=float, default=None,
                      help="keep timing until this much time is spent (1.0; quick 0)")
  args = parser.parse_args(argv)
  args.T = args.T or ([256] if args.quick else [1024, 4096, 16384])
  args.memory_T = args.memory_T or ([1024, 4096] if args.quick else [4096, 16384, 65536])
  args.min_runs = args.min_runs or (2 if args.quick else 5)
  if args.min_total_s is None:
    args.min_total_s = 0.0 if args.quick else 1.0
  return args


def write_result(args: argparse.Namespace, env: dict[str, Any], bmm: float,
                 timing: list[TimingRow], memory: list[MemoryRow]) -> None:
  """Writes everything measured so far to `args.out` as JSON."""
  result = {
      "environment": env,
      "config": {"batch": args.batch, "heads": args.heads, "key_dim": args.key_dim,
                 "value_dim": args.value_dim, "dtype": "float32", "chunk": CHUNK,
                 "T": args.T, "memory_T": args.memory_T, "families": args.families,
                 "impls": args.impls, "quick": args.quick,
                 "min_runs": args.min_runs, "max_runs": args.max_runs,
                 "statistic": "median"},
      "flop_model": {"linear_forward_per_token_head": "4*K*V + 2*C*(K+V)",
                     "attention_forward_per_token_head": "(K+V)*T (causal)",
                     "forward_backward": "3 x forward"},
      "batched_matmul_gflops": bmm,
      "timing": [dataclasses.asdict(row) for row in timing],
      "memory": [dataclasses.asdict(row) for row in memory],
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")


def plot_result(result: dict[str, Any], path: pathlib.Path) -> None:
  """The figure of a result JSON: the xla impl's forward+backward time and compiled memory vs T
  per op, log-log (jaxlin.evals.timing.plot)."""
  rows: dict[tuple[str, int], dict[str, Any]] = {}
  for row in result["timing"]:
    if row["impl"] == "xla" and row["pass_name"] == "forward+backward" and row["ms"] is not None:
      rows.setdefault((row["name"], row["T"]), {})["seconds"] = row["ms"] / 1e3
  for row in result["memory"]:
    rows.setdefault((row["name"], row["T"]), {})["memory_bytes"] = row["bytes"]
  env = result["environment"]
  timing_lib.plot(
      [{"case": name, "impl": "xla", "T": t, "pass": "forward+backward",
        "seconds": r.get("seconds"), "memory_bytes": r.get("memory_bytes")}
       for (name, t), r in sorted(rows.items())], str(path),
      title=f"forward+backward, B={result['config']['batch']} H={result['config']['heads']} "
            f"K={result['config']['key_dim']} V={result['config']['value_dim']} float32 "
            f"({env['device_kind']}, {env.get('cpu_count')} CPUs, jax {env['jax']})")


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  if args.plot_only:
    plot_result(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} from {args.out}")
    return
  env = environment()
  print(f"jax {env['jax']} on {env['platform']} ({env['device_kind']}), {env['cpu_count']} CPUs,"
        f" python {env['python']}, {env['date']}, load average {env['load_average_1min']}")

  def shape_at(t: int) -> Shape:
    return Shape(args.batch, t, args.heads, args.key_dim, args.value_dim)

  bmm = batched_matmul_gflops(min_runs=max(args.min_runs, 5), max_runs=max(args.max_runs, 5),
                              min_total_s=max(args.min_total_s, 0.5))
  print(f"batched matmul {BMM_BATCH} x {BMM_SIZE}^3 float32: {bmm:.1f} GFLOP/s\n")

  cases = all_cases(args.impls, args.families, args.gate_tiers)
  budget = device_memory_budget_bytes()
  timing: list[TimingRow] = []
  print(format_timing_table([]))
  memory: list[MemoryRow] = []
  for t in args.T:
    for case in cases:
      rows = time_case(case, shape_at(t), bmm, args, budget)
      print(format_timing_table(rows).split("\n", 2)[2], flush=True)
      timing.extend(rows)
      write_result(args, env, bmm, timing, memory)  # nothing is lost if the run is cut short

  print(f"\ncompiled fwd+bwd memory (xla impl, compiled only) at T = {args.memory_T}")
  for case in cases:
    if case.impl == "xla":
      memory.extend(memory_rows(case, shape_at, args.memory_T))
  print(format_memory_table(memory))
  fields = sorted({name for row in memory for name in row.fields})
  print(f"memory_analysis() fields: {', '.join(fields) or 'none (not available here)'}")
  print("fwd+bwd = temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes "
        "(all fields are kept in the JSON; on CPU peak_memory_in_bytes leaves out temp)")

  write_result(args, env, bmm, timing, memory)
  plot_result(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
  print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
  main(sys.argv[1:])
