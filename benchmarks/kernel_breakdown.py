"""Where the Pallas path's time goes, on GPU.

Usage: python benchmarks/kernel_breakdown.py [--T 8192] [--cases simple_gla gated_deltanet]
       python benchmarks/kernel_breakdown.py --quick   # CPU smoke test: tiny shapes, interpreter

For each case, forward+backward milliseconds of
  whole        the op with impl="pallas": on GPU the `pallas_kernels.fused_terms`
               kernels, gradient of sum(o * do)
  recurrence   only `gated_chunks` / `delta_chunks` (state, output and gradient kernels)
  ut           (delta rule) only the `ut_transform` kernels
and of the generic path (`KernelOptions(fused_terms=False)`):
  whole-terms  the op with the in-chunk terms in XLA + `chunk_recurrence`
  terms        only the in-chunk terms (`chunk_terms`), gradient of a random projection of them
  kernel       only `chunk_recurrence` on precomputed terms, gradient of sum(o * do)
  inverse      (delta rule) only the UT transform's (I + L)^-1 on [B, H, N, C, C], its gradient
Shapes and inputs as benchmarks/kernel_timing.py. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import kernel_timing as kb  # noqa: E402
import ops as op_benchmark  # noqa: E402
from jaxlin.ops import delta_terms, gated_terms, triangular  # noqa: E402
from jaxlin.ops.row_layout import RowLayout  # noqa: E402
from pallas_kernels.block_sizes import BlockSizes  # noqa: E402
from pallas_kernels.chunk_recurrence import chunk_recurrence  # noqa: E402
from pallas_kernels.dispatch import KernelOptions  # noqa: E402
from pallas_kernels.fused_terms import delta_chunks, gated_chunks  # noqa: E402
from pallas_kernels.fused_terms.ut_transform import ut_transform  # noqa: E402


def _grad_seconds(loss, args: list, argnums: tuple[int, ...], runs: int) -> float:
  """Median seconds of the compiled gradient of `loss` with respect to `argnums`."""
  fn = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
  return op_benchmark.median_seconds(fn, *args, min_runs=runs, max_runs=runs, min_total_s=0.0)


def _fused_parts(case: str, x: dict, runs: int, interpret: bool) -> dict[str, float]:
  """Forward+backward seconds of the `fused_terms` kernels alone ("recurrence", "ut")."""
  batch, time_, heads, key_dim = x["q"].shape
  layout = RowLayout(batch, heads, time_, kb.CHUNK)
  bf = lambda a: layout.rows(a, jnp.bfloat16)
  cum = layout.cumulative_gate(x["g"], None)
  h0 = jnp.zeros((batch * heads, key_dim, x["v"].shape[-1]), jnp.float32)
  q, k, v = bf(x["q"]), bf(x["k"]), bf(x["v"])
  d_o = jnp.ones(v.shape, jnp.float32)
  blocks = BlockSizes.default("gpu", key_dim, v.shape[-1], delta=case == "gated_deltanet")
  parts = {}
  if case != "gated_deltanet":
    loss = lambda q, k, v, b: jnp.sum(gated_chunks(q, k, v, b, None, h0, blocks=blocks,
                                                             interpret=interpret)[0] * d_o)
    parts["recurrence"] = _grad_seconds(loss, [q, k, v, cum], (0, 1, 2, 3), runs)
    return parts
  beta = layout.rows(x["beta"])
  u, w_k = jax.jit(lambda: ut_transform(k, k, v, beta, beta, cum, None,
                                                 interpret=interpret))()
  loss = lambda q, k, b, u, w: jnp.sum(
      delta_chunks(q, k, b, None, u, w, h0, blocks=blocks, interpret=interpret)[0] * d_o)
  parts["recurrence"] = _grad_seconds(loss, [q, k, cum, u, w_k], (0, 1, 2, 3, 4), runs)
  ut_loss = lambda k, v, beta, b: sum(
      jnp.sum(o.astype(jnp.float32))
      for o in ut_transform(k, k, v, beta, beta, b, None, interpret=interpret))
  parts["ut"] = _grad_seconds(ut_loss, [k, v, beta, cum], (0, 1, 2, 3), runs)
  return parts


def _terms_fn(case: str):
  def terms(x):
    q = x["q"].astype(jnp.float32) * x["q"].shape[-1] ** -0.5
    k, v = x["k"].astype(jnp.float32), x["v"].astype(jnp.float32)
    if case == "gated_deltanet":
      t = delta_terms.chunk_terms(q, k, v, x["beta"], x["g"], k, x["beta"], None, kb.CHUNK)
      return [t.q_in, t.k_out, t.scores, t.values, t.w_k, t.decay]
    t = gated_terms.chunk_terms(q, k, v, x["g"], None, None, kb.CHUNK)
    return [t.q_in, t.k_out, t.scores, t.values, t.decay]
  return terms


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--T", type=int, default=8192)
  p.add_argument("--cases", nargs="+", default=["simple_gla", "gated_deltanet"])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--out", default="/tmp/kernel_breakdown.json")
  p.add_argument("--quick", action="store_true",
                 help="B=1 H=2 K=V=32 T=128, 2 runs, GPU kernels in the Pallas interpreter")
  args = p.parse_args()
  batch, heads, dim, interpret = 4, 16, 128, False
  if args.quick:
    args.T, args.runs, batch, heads, dim, interpret = 128, 2, 1, 2, 32, True
  options = lambda **kw: KernelOptions(platform="gpu", interpret=interpret, **kw)
  rows = []
  for case in args.cases:
    inputs = kb.make_inputs(case, batch, args.T, heads, dim, dim)
    x = {n: jnp.asarray(a, jnp.bfloat16 if n in ("q", "k", "v") else jnp.float32)
         for n, a in inputs.items() if n != "do"}
    timing = {}
    whole = lambda opts: kb.time_jax(case, "pallas", inputs, jnp.bfloat16, args.runs,
                                     opts)["forward+backward"]
    timing["whole"] = whole(options())
    timing.update(_fused_parts(case, x, args.runs, interpret))
    timing["whole-terms"] = whole(options(fused_terms=False))

    terms = _terms_fn(case)
    outs = jax.jit(terms)(x)
    cots = [jnp.ones_like(o) for o in outs]
    loss = lambda x: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(terms(x), cots))
    g = jax.jit(jax.grad(loss)).lower(x).compile()
    timing["terms"] = op_benchmark.median_seconds(g, x, min_runs=args.runs, max_runs=args.runs,
                                                  min_total_s=0.0)

    rows_ = lambda a: a.reshape(-1, *a.shape[2:])
    bf = lambda a: rows_(a).astype(jnp.bfloat16)
    if case == "gated_deltanet":
      q_in, k_out, sc, u, w_k, dec = outs
    else:
      (q_in, k_out, sc, u, dec), w_k = outs, None
    dec = jnp.broadcast_to(dec[..., None], dec.shape + (dim,)) if dec.ndim == 3 else dec
    args_k = [bf(q_in), bf(k_out), bf(sc), bf(u), None if w_k is None else bf(w_k),
              rows_(dec)[:, :, None, :], jnp.zeros((batch * heads, dim, dim), jnp.float32)]
    d_o = jnp.ones(args_k[3].shape, jnp.float32)

    def kloss(a, b, c, d, e, f, h):
      o, _ = chunk_recurrence(a, b, c, d, e, f, h, platform="gpu", interpret=interpret)
      return jnp.sum(o * d_o)
    argnums = tuple(i for i, a in enumerate(args_k) if a is not None)
    kg = jax.jit(jax.grad(kloss, argnums=argnums)).lower(*args_k).compile()
    timing["kernel"] = op_benchmark.median_seconds(kg, *args_k, min_runs=args.runs,
                                                   max_runs=args.runs, min_total_s=0.0)
    if case == "gated_deltanet":
      lower = jnp.tril(0.1 * jax.random.normal(jax.random.key(0), outs[2].shape), -1)
      inv = lambda l: jnp.sum(triangular.unit_lower_inverse(l))
      ig = jax.jit(jax.grad(inv)).lower(lower).compile()
      timing["inverse"] = op_benchmark.median_seconds(ig, lower, min_runs=args.runs,
                                                      max_runs=args.runs, min_total_s=0.0)
    for name, s in timing.items():
      rows.append({"case": case, "T": args.T, "part": name, "ms": s * 1e3})
      print(f"{case:15} T={args.T} {name:11} {s * 1e3:8.3f} ms", flush=True)
  pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
