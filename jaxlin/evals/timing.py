"""Time and compiled memory of the recurrence ops against softmax attention, vs sequence length.

    from jaxlin.evals import timing
    rows = timing.sweep([1024, 4096], impls=timing.available_impls())
    timing.plot(rows, "long_context.png")
    timing.sequence_parallel(8192)      # on several devices: LASP-2 against one device

Each case gets random inputs [B, T, H, K] (B=1, H=4, K=V=64, float32 by default), is jitted
and compiled ahead of time, and reports:

    seconds        median wall time of `runs` calls after one warm-up call
    memory_bytes   argument + output + temporary bytes of the compiled program (XLA's
                   memory_analysis(); None where the backend does not give it)

Cases (`CASES`): "gla" (jaxlin.ops.gated_linear_attention with a per-key gate, GLA's op),
"gated_deltanet" (jaxlin.ops.delta_rule with a scalar gate and L2-normalised q, k) with impl
"xla" (chunked) or "pallas" (the kernels, on GPU / TPU: `available_impls`), and "softmax"
(causal jax.nn.dot_product_attention, XLA). `backward=True` times the gradient of sum(o)
with respect to every input. The linear ops cost O(T) per sequence, attention O(T^2).
`benchmarks/ops.py` is the full benchmark (more gates, model FLOP rates, JSON).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxlin import ops, parallel
from jaxlin.ops import lasp2
from jaxlin.ops.families import FAMILIES

CASES = ("gla", "gated_deltanet", "softmax")
CHUNK = 64
MEMORY_FRACTION = 0.5   # a case whose compiled program needs more of the device is not run
SLOW_RUN_S = 2.0  # a call slower than this (its warm-up) is timed only SLOW_RUN_COUNT times
SLOW_RUN_COUNT = 3


def available_impls() -> tuple[str, ...]:
  """("xla",), plus "pallas" where the default backend has the kernels: TPU, and GPUs of
  compute capability >= 8.0 (Pallas Triton)."""
  device = jax.devices()[0]
  if device.platform == "tpu" or (
      device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 8.0):
    return ("xla", "pallas")
  return ("xla",)


def device_memory_budget_bytes() -> int | None:
  """Memory available to the default device: its bytes_limit, else the host's physical memory."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # some backends do not implement it
    stats = {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def inputs(case: str, seq_len: int, *, batch: int = 1, heads: int = 4, dim: int = 64,
           dtype: Any = jnp.float32, seed: int = 0) -> dict[str, jax.Array]:
  """The op's keyword inputs for `case` at length `seq_len` (gates and beta in float32)."""
  if case not in CASES:
    raise ValueError(f"case: got {case!r}; expected one of {CASES}")
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (batch, seq_len, heads, dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  if case == "softmax":
    return {"q": q, "k": k, "v": v}
  if case == "gla":
    gate = jax.random.normal(keys[3], shape, jnp.float32)
    return {"q": q, "k": k, "v": v, "g": jax.nn.log_sigmoid(gate) / 16}
  unit = lambda x: x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3], jnp.float32))
  gate = jax.nn.log_sigmoid(jax.random.normal(keys[4], shape[:3], jnp.float32)) / 16
  return {"q": unit(q), "k": unit(k), "v": v, "beta": beta, "g": gate}


def op(case: str, impl: str) -> Callable[..., jax.Array]:
  """o = op(**inputs(case, T)) [B, T, H, V]."""
  if case == "softmax":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  if case == "gla":
    return lambda q, k, v, g: ops.gated_linear_attention(q, k, v, g, chunk_size=CHUNK,
                                                         impl=impl)[0]
  return lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, g, chunk_size=CHUNK,
                                                 impl=impl)[0]


def median_seconds(fn: Callable[..., Any], *args: Any, min_runs: int, max_runs: int,
                   min_total_s: float) -> float:
  """Median wall time of `fn(*args)` after one warm-up call (fn is already compiled).

  Runs at least `min_runs` times and until `min_total_s` is spent, at most `max_runs` times;
  a call whose warm-up took over SLOW_RUN_S seconds is run only SLOW_RUN_COUNT times.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  if time.perf_counter() - start > SLOW_RUN_S:
    min_runs = max_runs = min(min_runs, SLOW_RUN_COUNT)
  times: list[float] = []
  while len(times) < max_runs and (len(times) < min_runs or sum(times) < min_total_s):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_memory(compiled: Any) -> tuple[int | None, dict[str, int]]:
  """(temp + argument + output bytes, every integer field of memory_analysis()) or (None, {})."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None, {}
  if analysis is None:
    return None, {}
  fields = {name: getattr(analysis, name) for name in dir(analysis)
            if not name.startswith("_") and isinstance(getattr(analysis, name), int)}
  needed = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
  if not all(name in fields for name in needed):
    return None, fields
  return sum(fields[name] for name in needed), fields


def _program(case: str, impl: str, backward: bool) -> Callable[[dict[str, jax.Array]], Any]:
  forward = lambda x: op(case, impl)(**x)
  if not backward:
    return forward
  return jax.grad(lambda x: jnp.sum(forward(x).astype(jnp.float32)))


def measure(case: str, impl: str, seq_len: int, *, backward: bool = False, runs: int = 3,
            **shape: Any) -> dict[str, Any]:
  """One row: {case, impl, T, pass, seconds, memory_bytes, skipped} (`shape`: see `inputs`).
  A case whose compiled memory exceeds MEMORY_FRACTION of the device is compiled, not run
  (seconds None, `skipped` says why)."""
  x = inputs(case, seq_len, **shape)
  compiled = jax.jit(_program(case, impl, backward)).lower(x).compile()
  memory, budget = compiled_memory(compiled)[0], device_memory_budget_bytes()
  row = {"case": case, "impl": "xla" if case == "softmax" else impl, "T": seq_len,
         "pass": "forward+backward" if backward else "forward", "seconds": None,
         "memory_bytes": memory, "skipped": None}
  if memory is not None and budget is not None and memory > MEMORY_FRACTION * budget:
    row["skipped"] = (f"needs {memory / 2**30:.1f} GiB, over {MEMORY_FRACTION:.0%} of the "
                      f"device's {budget / 2**30:.1f} GiB")
  else:
    row["seconds"] = median_seconds(compiled, x, min_runs=runs, max_runs=runs, min_total_s=0.0)
  return row


def sweep(lengths: list[int], impls: tuple[str, ...] = ("xla",), cases: tuple[str, ...] = CASES,
          *, backward: bool = False, runs: int = 3, log: Callable[[str], None] = print,
          **shape: Any) -> list[dict[str, Any]]:
  """`measure` of every case x impl x length (softmax once per length: it has one impl)."""
  rows = []
  for case in cases:
    for impl in (("xla",) if case == "softmax" else impls):
      for seq_len in lengths:
        rows.append(measure(case, impl, seq_len, backward=backward, runs=runs, **shape))
        row = rows[-1]
        time_ms = "skipped" if row["seconds"] is None else f"{row['seconds'] * 1e3:.2f} ms"
        memory = ("memory n/a" if row["memory_bytes"] is None
                  else f"{row['memory_bytes'] / 2**20:.1f} MiB")
        log(f"{case:15s} {impl:7s} T={seq_len:6d}  {time_ms:>12s}  {memory:>12s}"
            + (f"  ({row['skipped']})" if row["skipped"] else ""))
  return rows


def sequence_parallel(seq_len: int, *, devices: list | None = None, runs: int = 3,
                      **shape: Any) -> dict[str, Any]:
  """Gated DeltaNet's op, forward + backward, with its sequence split over `devices` (default:
  all) by LASP-2 (`lasp2.sequence_op`: one all-gather of the spans' states) against the
  same op on one device: {devices, T, seconds_one_device, seconds_lasp2}."""
  devices = list(jax.devices() if devices is None else devices)
  x = inputs("gated_deltanet", seq_len, **shape)
  one = jax.jit(_program("gated_deltanet", "xla", backward=True)).lower(x).compile()
  result = {"devices": len(devices), "T": seq_len,
            "seconds_one_device": median_seconds(one, x, min_runs=runs, max_runs=runs,
                                                 min_total_s=0.0)}
  mesh = parallel.make_mesh({"data": 1, "sequence": len(devices)}, devices)
  spans = NamedSharding(mesh, PartitionSpec(None, "sequence"))

  def loss(x: dict[str, jax.Array]) -> jax.Array:
    o, _ = lasp2.sequence_op(FAMILIES["delta"], x["q"], x["k"], x["v"],
                             {"beta": x["beta"], "g": x["g"]}, {}, scale=None,
                             segment_ids=None, initial_state=None, output_final_state=False,
                             chunk_size=CHUNK, impl="xla")
    return jnp.sum(o.astype(jnp.float32))

  x = jax.device_put(x, spans)
  with parallel.activations_on(mesh):
    split = jax.jit(jax.grad(loss), in_shardings=(spans,), out_shardings=spans).lower(x).compile()
  result["seconds_lasp2"] = median_seconds(split, x, min_runs=runs, max_runs=runs,
                                           min_total_s=0.0)
  return result


def plot(rows: list[dict[str, Any]], path: str | None = None, title: str | None = None
         ) -> Figure:
  """Time and compiled memory vs T, log-log, one line per (case, impl) (a None value is not
  drawn); saved to `path` unless it is None; `title` defaults to the passes and this device."""
  fig = Figure(figsize=(11, 4))
  FigureCanvasAgg(fig)
  time_ax, memory_ax = fig.subplots(1, 2)
  for key in dict.fromkeys((r["case"], r["impl"]) for r in rows):
    line = sorted((r for r in rows if (r["case"], r["impl"]) == key), key=lambda r: r["T"])
    lengths = [r["T"] for r in line]
    seconds = [np.nan if r["seconds"] is None else r["seconds"] * 1e3 for r in line]
    time_ax.plot(lengths, seconds, "-o", label=" ".join(key))
    memory = [np.nan if r["memory_bytes"] is None else r["memory_bytes"] / 2**20 for r in line]
    memory_ax.plot(lengths, memory, "-o", label=" ".join(key))
  for ax, label in ((time_ax, "time (ms)"), (memory_ax, "compiled memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  if title is None:
    title = f"{', '.join(sorted({r['pass'] for r in rows}))} on {jax.devices()[0].device_kind}"
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig
