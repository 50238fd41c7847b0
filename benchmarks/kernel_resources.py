"""Registers, spills and shared memory of every GPU kernel, without a GPU.

Usage:
  pip install -e '.[resources]'   # triton: the compiler, ptxas, cuobjdump; no GPU or driver
  python benchmarks/kernel_resources.py                          # K=V=128 bf16, chunk 64
  python benchmarks/kernel_resources.py --chunk-warps 4 8 --out /tmp/resources.json
  python benchmarks/kernel_resources.py --cases gla --K 64 --V 64 --documents

For each case (as benchmarks/kernel_timing.py: simple_gla, gla, gated_deltanet) the forward+backward
of the op with impl="pallas" is lowered for CUDA under an abstract H100 (`pallas_kernels.
gpu_lowering.triton_kernels`). Each kernel's Triton IR is compiled by the installed `triton`
package for sm_90 with the kernel's own num_warps and num_stages, and `cuobjdump` reads the
cubin (`gpu_lowering.triton_resources`). Columns:
  regs     registers per thread (255 is the ceiling: at it, the compiler spills)
  stack    bytes of local memory per thread: register spills (0 is the goal)
  shared   bytes of shared memory Triton allocates (an H100 block may use up to 227 KiB)
  compile  seconds the pip triton takes to compile the kernel on this host's CPU (a fresh
           cache: TTIR to cubin, ptxas included); XLA's compile of the kernel on a GPU host
           costs about as much, once per shape. A kernel whose IR was compiled earlier in
           the run (the state kernels of several cases) comes from the cache, near 0 s
XLA compiles the same IR with its own copy of Triton, so the figures are the pip triton's
estimate of the real ones, not a measurement on the device; they agree on what spills when the
two Triton versions are close. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # gpu_lowering
from pallas_kernels.block_sizes import BlockSizes  # noqa: E402
from pallas_kernels.dispatch import KernelOptions  # noqa: E402
from gpu_lowering import op_gradient, triton_kernels, triton_resources  # noqa: E402

FAMILIES = {"simple_gla": "gated", "gla": "gated-per-key", "gated_deltanet": "delta"}
CASES = tuple(FAMILIES)
H100_SHARED_BYTES = 227 * 1024


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument("--K", type=int, default=128, help="key dimension")
  parser.add_argument("--V", type=int, default=128, help="value dimension")
  parser.add_argument("--T", type=int, default=128,
                      help="sequence length (> 64 gives the kernels' chunk of 64)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  parser.add_argument("--documents", action="store_true", help="pass segment_ids")
  parser.add_argument("--chunk-warps", type=int, nargs="+", default=[None],
                      help="BlockSizes.chunk_warps values (default: the platform default)")
  parser.add_argument("--block-k", type=int, default=None,
                      help="BlockSizes.block_k (default: the platform default)")
  parser.add_argument("--block-v", type=int, default=None,
                      help="BlockSizes.block_v (default: the platform default)")
  parser.add_argument("--fused-terms", choices=("true", "false"), default="true",
                      help="KernelOptions.fused_terms")
  parser.add_argument("--out", default="benchmarks/results/kernel_resources.json")
  args = parser.parse_args(argv)
  os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_resources_")  # time compiles
  try:
    import triton  # pylint: disable=import-outside-toplevel
  except ImportError:
    parser.error("needs the triton package: pip install -e '.[resources]'")
  dtype = jnp.dtype(args.dtype)
  rows: list[dict[str, Any]] = []
  print(f"{'case':15s} {'chunk_warps':>11s} {'kernel':27s} {'warps':>5s} {'stages':>6s} "
        f"{'regs':>5s} {'stack':>6s} {'shared':>7s} {'compile':>7s}")
  for case in args.cases:
    for chunk_warps in args.chunk_warps:
      blocks = BlockSizes.default("gpu", args.K, args.V, delta=case == "gated_deltanet")
      if chunk_warps is not None:
        blocks = dataclasses.replace(blocks, chunk_warps=chunk_warps)
      if args.block_k is not None:
        blocks = dataclasses.replace(blocks, block_k=args.block_k)
      if args.block_v is not None:
        blocks = dataclasses.replace(blocks, block_v=args.block_v)
      options = KernelOptions(platform="gpu", block_sizes=blocks,
                              fused_terms=args.fused_terms == "true")
      fn, fn_args = op_gradient(FAMILIES[case], args.K, args.V, dtype, args.T, args.documents,
                                options)
      for kernel in triton_kernels(fn, *fn_args):
        start = time.perf_counter()
        usage = triton_resources(kernel)
        usage["compile_s"] = round(time.perf_counter() - start, 1)
        row = {"case": case, "chunk_warps": blocks.chunk_warps, "block_k": blocks.block_k,
               "kernel": kernel.name,
               "num_warps": kernel.num_warps, "num_stages": kernel.num_stages, **usage}
        rows.append(row)
        flag = "  SPILLS" if usage["stack"] else ""
        flag += "  OVER SHARED" if usage["shared"] > H100_SHARED_BYTES else ""
        print(f"{case:15s} {blocks.chunk_warps:11d} {kernel.name:27s} {kernel.num_warps:5d} "
              f"{kernel.num_stages:6d} {usage['regs']:5d} {usage['stack']:6d} "
              f"{usage['shared']:7d} {usage['compile_s']:6.1f}s{flag}", flush=True)
  result = {"config": {**vars(args), "jax": jax.__version__, "triton": triton.__version__},
            "kernels": rows}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")
  return rows


if __name__ == "__main__":
  main()
