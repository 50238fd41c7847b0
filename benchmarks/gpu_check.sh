#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU kernel tests natively, then the kernel benchmarks.
#
# Usage (from the repo root, on the GPU host; fla-core's wheel in .whl/ if you want fla rows):
#   bash benchmarks/gpu_check.sh [quick|tests|bench|full]
# The GPU host reaches no package registry, so fetch the wheels beforehand where one is reachable
# (.whl/ is git-ignored: name it in the device tool's `carry`):
#   pip download --no-deps -d .whl fla-core==0.4.2 einops
# tests / bench: only the first step / only the benchmarks of quick (the steps' limits add up to
#   more than one 600 s device call, so split them there: `tests` in one call, `bench` in the next).
# quick (default, ~10 min): kernel tests on the GPU, then kernel_timing.py at T=8192 for simple GLA, GLA,
#   RWKV6 and Gated DeltaNet (pallas, pallas-terms, fla), with its agreement check: every impl's o
#   and gradients against the float32 XLA form, fla's included.
# full: also kernel_breakdown.py at T=8192, T=2048, xla, and a warps sweep of the fused-terms
#   kernels.
# Every step has its own time limit and the script goes on after a failure; JSON results land in
# ${OUT:-/tmp}/ (kernels_gpu.json, kernel_breakdown_gpu.json, sweep_gpu.json).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-quick}
case $mode in
  quick|tests|bench|full) ;;
  *) echo "gpu_check.sh: mode '$mode' is not one of quick, tests, bench, full" >&2; exit 2 ;;
esac
out=${OUT:-/tmp}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

step() {  # step <seconds> <description> <command...>
  local limit=$1 what=$2
  shift 2
  echo "==== $what (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  echo "==== $what: exit $? after $((SECONDS - start))s"
}

python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
if [[ $mode != bench ]]; then
  step 240 "kernel tests on the GPU" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_key_gate.py tests/test_kernels_ut_transform.py \
    -k "(gpu or fall or support or block or fused_terms or matches or lowers) and not tpu"
fi
[[ $mode == tests ]] && exit 0
step 480 "kernel_timing.py T=8192" python3 benchmarks/kernel_timing.py --T 8192 \
  --impls pallas pallas-terms fla --out "$out/kernels_gpu.json"
if [[ $mode == full ]]; then
  step 180 "kernel_breakdown.py T=8192" python3 benchmarks/kernel_breakdown.py --T 8192 \
    --out "$out/kernel_breakdown_gpu.json"
  step 300 "kernel_timing.py T=2048, and xla" python3 benchmarks/kernel_timing.py --T 2048 8192 \
    --impls pallas xla fla --no-check --out "$out/kernels_gpu_full.json"
  step 300 "fused-terms warps sweep" python3 benchmarks/kernel_timing.py --T 8192 \
    --impls --block-v 64 --block-k 64 --num-warps 4 8 \
    --chunk-warps 4 8 --no-check --out "$out/sweep_gpu.json"
fi
