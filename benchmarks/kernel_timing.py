"""Benchmark the Pallas kernels against the XLA chunked form (and fla's Triton kernels on GPU).

Usage:
  python benchmarks/kernel_timing.py                         # B=4 H=16 K=V=128 bf16, T in 2048 8192
  python benchmarks/kernel_timing.py --T 2048 --out /tmp/kernels.json
  python benchmarks/kernel_timing.py --quick                 # tiny shapes: a smoke test of the script
  python benchmarks/kernel_timing.py --quick --impls pallas --interpret gpu   # GPU kernels, on CPU

Cases, on the same inputs (keys L2-normalised; gates log-sigmoid of N(3, 1) scaled like GLA):
  simple_gla        G family, scalar gate [B,T,H]           fla: chunk_simple_gla
  gla               G family, per-key gate [B,T,H,K]        fla: chunk_gla
  rwkv6             gla plus the RWKV6 bonus u [H,K]         fla: chunk_rwkv6
  gated_deltanet    D family, scalar gate, beta [B,T,H]     fla: chunk_gated_delta_rule
each with jaxlin impl "pallas" (the kernel for this backend), "pallas-terms" (on GPU: the
in-chunk terms in XLA and the generic kernels instead of `pallas_kernels.fused_terms`,
i.e. `KernelOptions(fused_terms=False)`) and "xla", and fla when the `fla`
package (fla-core) and torch with CUDA are importable. "forward" times the op alone,
"forward+backward" the gradient of sum(o * do) with respect to every input (q, k, v, g, beta, u).

Agreement (--check, on by default): each impl's o and gradients on the benchmark inputs are
compared with jaxlin's "xla" form in float32 at HIGHEST matmul precision on the same inputs
(q, k, v rounded through the benchmark dtype): relative error ||x - x_ref|| / ||x_ref|| per
output, printed and written as "agreement" rows. fla is checked the same way, so a wrong
gradient on either side shows next to its time (fla-core 0.4.2 has no guard against the
Hopper dq/dk bug of fla issue #640).

Timing: every function compiled first, one warm-up call, then the median over --runs calls
(`block_until_ready` for JAX; CUDA events after `torch.cuda.synchronize` for torch).
TFLOP/s counts a model FLOP figure, the same for every impl: per token and head, forward
F = 4KV + 2C(K+V) for G (C = 64), F + 2(K+V) for RWKV6 (the bonus term (q o u).k v) and
F + 2KV + 4CK + 2CV for D (the W_k S product, the removal scores and the UT solve applied to
[V | K]); forward+backward = 3F. Ratios
(xla / pallas, fla / pallas) are taken inside one run, so they survive a noisy machine.
Results are printed and written as JSON after every case.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import statistics
import sys
from typing import Any, Callable, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
# benchmarks/ops.py (environment()), loaded by path: benchmarks/ never goes on sys.path from a
# test, where its generic module names (ops, train, recall) could shadow installed packages
_OPS_SPEC = importlib.util.spec_from_file_location(
    "jaxlin_benchmark_ops", pathlib.Path(__file__).resolve().parent / "ops.py")
op_benchmark = importlib.util.module_from_spec(_OPS_SPEC)
sys.modules[_OPS_SPEC.name] = op_benchmark   # its dataclasses look their module up
_OPS_SPEC.loader.exec_module(op_benchmark)
from jaxlin.ops import delta_rule, gated_linear_attention  # noqa: E402
from pallas_kernels.block_sizes import BlockSizes  # noqa: E402
from pallas_kernels.dispatch import KernelOptions  # noqa: E402

CASES = ("simple_gla", "gla", "rwkv6", "gated_deltanet")
PER_KEY_GATE = ("gla", "rwkv6")
CHUNK = 64


def make_inputs(case: str, batch: int, time_: int, heads: int, key_dim: int, value_dim: int,
                seed: int = 0) -> dict[str, np.ndarray]:
  """float32 numpy inputs of one case (cast to the benchmark dtype by each impl)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  d = {"q": normal(batch, time_, heads, key_dim), "k": unit(normal(batch, time_, heads, key_dim)),
       "v": normal(batch, time_, heads, value_dim)}
  per_key = case in PER_KEY_GATE
  gate_shape = (batch, time_, heads, key_dim) if per_key else (batch, time_, heads)
  d["g"] = (log_sigmoid(3.0 + normal(*gate_shape)) / (16.0 if per_key else 1.0)).astype(
      np.float32)
  if case == "rwkv6":
    d["u"] = 0.5 * normal(heads, key_dim)
  if case == "gated_deltanet":
    d["beta"] = (1.0 / (1.0 + np.exp(-normal(batch, time_, heads)))).astype(np.float32)
  d["do"] = normal(batch, time_, heads, value_dim)
  return d


def model_flops(case: str, batch: int, time_: int, heads: int, key_dim: int,
                value_dim: int) -> float:
  """Forward model FLOPs (module docstring)."""
  per_token = 4 * key_dim * value_dim + 2 * CHUNK * (key_dim + value_dim)
  if case == "rwkv6":
    per_token += 2 * (key_dim + value_dim)
  if case == "gated_deltanet":
    per_token += 2 * key_dim * value_dim + 4 * CHUNK * key_dim + 2 * CHUNK * value_dim
  return float(batch * time_ * heads * per_token)


@functools.lru_cache(maxsize=None)
def jax_fns(case: str, impl: str, kernel: KernelOptions | None) -> tuple[Callable, Callable]:
  """(forward, forward+backward) jitted functions of a dict of inputs (one pair per call
  signature, so the timing and the agreement check share their compilations)."""
  def op(x: dict[str, jax.Array]) -> jax.Array:
    if case == "gated_deltanet":
      return delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], impl=impl, kernel=kernel)[0]
    return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], bonus=x.get("u"), impl=impl,
                                  kernel=kernel)[0]

  def loss(x: dict[str, jax.Array], do: jax.Array) -> jax.Array:
    return jnp.sum(op(x).astype(jnp.float32) * do)

  return jax.jit(op), jax.jit(jax.grad(loss))


LEAVES = ("q", "k", "v", "g", "beta", "u")   # the inputs a case may have, gradients taken
LOW_PRECISION = ("q", "k", "v")              # in the benchmark dtype; the rest in float32


def jax_inputs(inputs: dict[str, np.ndarray], dtype: Any) -> dict[str, jax.Array]:
  """The op's inputs: q, k, v in the benchmark dtype, gates, beta and u in float32."""
  return {n: jnp.asarray(a, dtype if n in LOW_PRECISION else jnp.float32)
          for n, a in inputs.items() if n != "do"}


def time_jax(case: str, impl: str, inputs: dict[str, np.ndarray], dtype: Any, runs: int,
             kernel: KernelOptions | None = None) -> dict[str, float]:
  fwd, fwd_bwd = jax_fns(case, impl, kernel)
  x = jax_inputs(inputs, dtype)
  do = jnp.asarray(inputs["do"])
  out = {}
  for name, fn, args in (("forward", fwd, (x,)), ("forward+backward", fwd_bwd, (x, do))):
    compiled = fn.lower(*args).compile()
    out[name] = op_benchmark.median_seconds(compiled, *args, min_runs=runs, max_runs=runs,
                                            min_total_s=0.0)
  return out


def jax_outputs(case: str, impl: str, inputs: dict[str, np.ndarray], dtype: Any,
                kernel: KernelOptions | None = None) -> dict[str, np.ndarray]:
  """o and the gradient of sum(o * do) for every input ("dq", "dk", ...), float32 numpy."""
  fwd, fwd_bwd = jax_fns(case, impl, kernel)
  x = jax_inputs(inputs, dtype)
  out = {"o": np.asarray(fwd(x), np.float32)}
  grads = fwd_bwd(x, jnp.asarray(inputs["do"]))
  out.update({f"d{n}": np.asarray(grads[n], np.float32) for n in LEAVES if n in grads})
  return out


def reference_outputs(case: str, inputs: dict[str, np.ndarray],
                      dtype: Any) -> dict[str, np.ndarray]:
  """`jax_outputs` of the "xla" form in float32 at HIGHEST precision, on the inputs every impl
  sees (q, k, v rounded through `dtype`)."""
  rounded = {n: (np.asarray(jnp.asarray(a, dtype), np.float32) if n in LOW_PRECISION else a)
             for n, a in inputs.items()}
  with jax.default_matmul_precision("highest"):
    return jax_outputs(case, "xla", rounded, jnp.float32)


def relative_errors(got: dict[str, np.ndarray],
                    want: dict[str, np.ndarray]) -> dict[str, float]:
  """||got - want|| / ||want|| (Frobenius) for every name of `want`; a missing one is an error."""
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"outputs {missing} missing: got {sorted(got)}, want {sorted(want)}")
  return {n: float(np.linalg.norm(got[n].astype(np.float64) - w.astype(np.float64))
                   / max(np.linalg.norm(w.astype(np.float64)), np.finfo(np.float64).tiny))
          for n, w in want.items()}


def fla_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import fla.ops  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return torch.cuda.is_available()
  except ImportError:
    return False


def fla_runner(case: str, inputs: dict[str, np.ndarray]) -> Callable[[bool], dict[str, Any]]:
  """run(backward) -> {"o": o, "dq": ..., ...} (torch tensors; gradients only with backward):
  fla's Triton kernel of `case` on the same inputs (bf16 q, k, v; float32 gates and u), with
  fla's defaults matching jaxlin's (layout [B,T,H,K], scale K**-0.5, log-space gates)."""
  import torch  # pylint: disable=import-outside-toplevel
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=import-outside-toplevel
  from fla.ops.gla import chunk_gla  # pylint: disable=import-outside-toplevel
  from fla.ops.rwkv6 import chunk_rwkv6  # pylint: disable=import-outside-toplevel
  from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=import-outside-toplevel

  dev = torch.device("cuda")
  t = {n: torch.from_numpy(a).to(dev) for n, a in inputs.items()}
  for n in LOW_PRECISION:
    t[n] = t[n].to(torch.bfloat16)
  leaves = [n for n in LEAVES if n in t]

  def run(backward: bool) -> dict[str, Any]:
    xs = {n: t[n].detach().requires_grad_(backward) for n in leaves}
    if case == "gla":
      o, _ = chunk_gla(xs["q"], xs["k"], xs["v"], xs["g"])
    elif case == "rwkv6":
      o, _ = chunk_rwkv6(xs["q"], xs["k"], xs["v"], xs["g"], xs["u"])
    elif case == "simple_gla":
      o, _ = chunk_simple_gla(xs["q"], xs["k"], xs["v"], xs["g"])
    else:
      o, _ = chunk_gated_delta_rule(xs["q"], xs["k"], xs["v"], xs["g"], xs["beta"])
    out = {"o": o}
    if backward:
      o.backward(t["do"].to(o.dtype))
      out.update({f"d{n}": x.grad for n, x in xs.items()})
    return out

  return run


def fla_outputs(case: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`jax_outputs` of fla's kernel (`fla_runner`), float32 numpy."""
  return {n: x.detach().float().cpu().numpy() for n, x in fla_runner(case, inputs)(True).items()}


def time_fla(case: str, inputs: dict[str, np.ndarray], runs: int) -> dict[str, float]:
  """fla's Triton kernels on the same inputs (`fla_runner`)."""
  import torch  # pylint: disable=import-outside-toplevel

  run = fla_runner(case, inputs)
  out = {}
  for name, backward in (("forward", False), ("forward+backward", True)):
    for _ in range(2):
      run(backward)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      run(backward)
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    out[name] = statistics.median(times)
  return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
  p.add_argument("--B", type=int, default=4)
  p.add_argument("--H", type=int, default=16)
  p.add_argument("--K", type=int, default=128)
  p.add_argument("--V", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  p.add_argument("--impls", nargs="*", default=["pallas", "pallas-terms", "xla", "fla"])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="compare each impl's o and gradients with the float32 XLA form "
                      "(module docstring); --no-check to time only")
  p.add_argument("--block-v", type=int, nargs="*", default=[],
                 help="also time the kernel with these BlockSizes.block_v "
                      "(impl 'pallas:block_v:block_k:warps:chunk_warps')")
  p.add_argument("--block-k", type=int, nargs="*", default=[64],
                 help="with --block-v: BlockSizes.block_k values to try (gated family)")
  p.add_argument("--num-warps", type=int, nargs="*", default=[4],
                 help="with --block-v: Triton num_warps values to try (state kernels)")
  p.add_argument("--chunk-warps", type=int, nargs="*", default=[8],
                 help="with --block-v: BlockSizes.chunk_warps values to try (the `fused_terms` "
                      "per-chunk kernels; impl 'pallas:block_v:block_k:warps:chunk_warps')")
  p.add_argument("--interpret", choices=["gpu", "tpu"],
                 help="run the Pallas impls' kernels of this platform in the Pallas interpreter "
                      "(on CPU: checks the kernels through this script; times mean nothing)")
  p.add_argument("--quick", action="store_true", help="B=1 H=2 K=V=64 T=128, 3 runs")
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "kernels.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.T, args.B, args.H, args.K, args.V, args.runs = [128], 1, 2, 64, 64, 3
  return args


def jax_impl(impl: str, interpret: str | None = None) -> tuple[str, KernelOptions | None]:
  """(the op's `impl`, its `KernelOptions`) of a benchmark impl name (`parse_args`); with
  `interpret` ("gpu" or "tpu"), the Pallas impls run that platform's kernels in the
  interpreter (a CPU check of the script and the kernels, not a timing)."""
  kernel = None
  if impl == "pallas-terms":
    kernel = KernelOptions(fused_terms=False)
  elif impl.startswith("pallas:"):
    _, bv, bk, warps, chunk_warps = impl.split(":")
    kernel = KernelOptions(block_sizes=BlockSizes(block_v=int(bv), block_k=int(bk),
                                                  num_warps=int(warps),
                                                  chunk_warps=int(chunk_warps)))
  name = "pallas" if impl.startswith("pallas") else impl
  if name == "pallas" and interpret is not None:
    kernel = dataclasses.replace(kernel or KernelOptions(), platform=interpret, interpret=True)
  return name, kernel


def check_agreement(case: str, impl: str, inputs: dict[str, np.ndarray], dtype: Any,
                    reference: dict[str, np.ndarray],
                    interpret: str | None = None) -> dict[str, float]:
  """`relative_errors` of one impl's o and gradients against `reference_outputs`."""
  if impl == "fla":
    return relative_errors(fla_outputs(case, inputs), reference)
  name, kernel = jax_impl(impl, interpret)
  return relative_errors(jax_outputs(case, name, inputs, dtype, kernel), reference)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  impls = [i for i in args.impls if i != "fla" or fla_available()]
  impls += [f"pallas:{bv}:{bk}:{w}:{cw}" for bv in args.block_v for bk in args.block_k
            for w in args.num_warps for cw in args.chunk_warps]
  if "fla" in args.impls and "fla" not in impls:
    print("fla (fla-core with torch+CUDA) not importable: fla rows skipped")
  result = {"environment": op_benchmark.environment(), "args": vars(args), "rows": [],
            "agreement": []}
  out_path = pathlib.Path(args.out)

  def save() -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))

  print(f"{'case':15} {'T':>6} {'impl':16} {'pass':17} {'ms':>9} {'TFLOP/s':>8} {'vs pallas':>9}")
  for time_ in args.T:
    for case in args.cases:
      inputs = make_inputs(case, args.B, time_, args.H, args.K, args.V)
      flops = model_flops(case, args.B, time_, args.H, args.K, args.V)
      reference = reference_outputs(case, inputs, dtype) if args.check and impls else None
      timings: dict[str, dict[str, float]] = {}
      for impl in impls:
        try:
          if impl == "fla":
            timings[impl] = time_fla(case, inputs, args.runs)
          else:
            name, kernel = jax_impl(impl, args.interpret)
            timings[impl] = time_jax(case, name, inputs, dtype, args.runs, kernel)
        except Exception as e:  # pylint: disable=broad-except  (report and go on)
          print(f"{case:15} {time_:6} {impl:16} failed: {type(e).__name__}: {e}"[:400])
          continue
        for pass_, seconds in timings[impl].items():
          total = flops * (3 if pass_ == "forward+backward" else 1)
          base = timings.get("pallas", {}).get(pass_)
          row = {"case": case, "T": time_, "impl": impl, "pass": pass_, "seconds": seconds,
                 "model_tflops": total / seconds / 1e12,
                 "time_over_pallas": None if base is None else seconds / base}
          result["rows"].append(row)
          ratio = "" if base is None else f"{seconds / base:9.2f}"
          print(f"{case:15} {time_:6} {impl:16} {pass_:17} {seconds * 1e3:9.3f} "
                f"{row['model_tflops']:8.2f} {ratio}", flush=True)
        if reference is not None:
          try:
            errors = check_agreement(case, impl, inputs, dtype, reference, args.interpret)
          except Exception as e:  # pylint: disable=broad-except  (report and go on)
            print(f"{case:15} {time_:6} {impl:16} check failed: {type(e).__name__}: {e}"[:400])
          else:
            result["agreement"].append({"case": case, "T": time_, "impl": impl,
                                        "relative_error": errors})
            print(f"{case:15} {time_:6} {impl:16} {'rel. error':17} "
                  + " ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)
        save()
  save()
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
