#!/usr/bin/env bash
# Every check that needs a GPU, in one command, for a machine with a CUDA device and no registry
# (the image must hold torch, transformers, pytest, hypothesis, pybind11, scikit-build-core, cmake
# and ninja: a lent H200's does). About 10 minutes on an H200, most of it the build; each step's
# output goes to OUT (default ./gpu-checks), and the script goes on past a failing step so that
# one call reports them all.
#
#   1. build and install flower_ext with its CUDA kernels, for this device's architecture only;
#   2. the op tests (tests/flower_ext), whose CUDA cases compare every kernel with the CPU's,
#      from outside the checkout (the source folder has no compiled module);
#   3. benchmarks/gpu_bandwidth.py: log_flows against the device's copy bandwidth (target >= 50%);
#   4. benchmarks/bench_rollout_calls.py on CUDA with the status words read once per rollout
#      (the default) and after every call: the per-call target of the ops inside a rollout, and
#      what deferring the checks saves.
#
#   scripts/gpu_checks.sh [OUT]
set -uo pipefail
repo="$(realpath "$(dirname "$0")/..")"
out="$(realpath -m "${1:-${OUT:-gpu-checks}}")"
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: runs COMMAND, its output in OUT/NAME.log, and says how it ended
  local name=$1
  shift
  local start=$SECONDS
  if "$@" > "$out/$name.log" 2>&1; then
    echo "$name: ok ($((SECONDS - start)) s)"
  else
    echo "$name: FAILED ($((SECONDS - start)) s), see $out/$name.log"
    status=1
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/device.txt"
cat "$out/device.txt"
step build env CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native" \
    python3 -m pip install --no-build-isolation --no-deps --no-cache-dir "$repo"
python3 -c "import flower_ext._C as c; assert c.has_cuda, 'built without CUDA kernels'" \
    || { echo "flower_ext has no CUDA kernels: see $out/build.log"; exit 1; }
step op-tests bash -c "cd /tmp && python3 -m pytest '$repo/tests/flower_ext' -q -p no:cacheprovider"
step gpu-bandwidth bash -c "cd '$repo/benchmarks' && python3 gpu_bandwidth.py"
for checks in deferred immediate; do
  step "rollout-calls-$checks" bash -c "cd '$repo/benchmarks' && python3 bench_rollout_calls.py \
      --device cuda --checks $checks --json '$out/rollout_calls_cuda_$checks.json'"
done
exit $status
