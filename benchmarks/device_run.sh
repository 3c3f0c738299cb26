#!/usr/bin/env bash
# The GPU checks for a lent device machine, one part per call of the `device` tool's `run` (from
# the repository root), in order of importance: a session has 15 device minutes in all. That
# machine's image has torch and triton but not this package's other dependencies and no network,
# so everything runs from the source tree (a link maps kernels/ to euphonium.kernels, as setup.py's
# package_dir does for an install):
#
#   bash benchmarks/device_run.sh targets  # pytest -m gpu, then sde_step and sde_log_prob (the targets)
#   bash benchmarks/device_run.sh ops      # reward_grad, advantages, grpo_loss, compat
#   bash benchmarks/device_run.sh train    # train_step (toy and Wan-shaped) and the kernel report
#
# Which scripts make up a part comes from benchmarks/registry.py (`python -m benchmarks.registry
# --scripts --part ops`), the one list of benchmarks that run_all.py and the README table read too.
#
# Nobody has timed these on a GPU yet (torch.compile compiles each shape once): a part that runs
# long can be narrowed, e.g. `bash benchmarks/device_run.sh targets --only sde_step`.
# `train` needs diffusers: download its wheel here (`pip download diffusers --no-deps -d .wheels`,
# with .wheels in .git/info/exclude) and name .wheels in the run's `carry`. Logs and the result
# files come back packed in $OUT/results.tgz (the device tool returns at most 8 files); unpack it
# over the checkout and regenerate the README table with `python benchmarks/make_readme_table.py`.
# Extra arguments go to run_all.py (e.g. --quick for a dry run on a CPU).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
part=${1:-targets}
shift || true
status=0
case "$part" in
  targets | ops | train) ;;
  *)
    echo "usage: bash benchmarks/device_run.sh targets|ops|train [run_all.py arguments]" >&2
    exit 2
    ;;
esac
# The part's scripts (names without .py), from the registry.
only=$($PY -m benchmarks.registry --scripts --part "$part") && [ -n "$only" ] || {
  echo "python -m benchmarks.registry gave no scripts for part $part" >&2
  exit 2
}
if [ ! -e euphonium/kernels ]; then
  ln -s ../kernels euphonium/kernels
  trap 'rm -f euphonium/kernels' EXIT
fi

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"

case "$part" in
  targets)
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_sde_ops.py tests/test_grpo_loss.py tests/test_reward_grad.py \
      2>&1 | tee "$OUT/pytest_gpu.log" || status=1
    $PY benchmarks/run_all.py --only $only "$@" 2>&1 | tee "$OUT/bench_targets.log" || status=1
    ;;
  ops)
    $PY benchmarks/run_all.py --only $only "$@" 2>&1 | tee "$OUT/bench_ops.log" || status=1
    ;;
  train)
    wheels=(.wheels/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then $PY -m pip install -q --no-deps --no-index "${wheels[@]}" || status=1; fi
    $PY benchmarks/run_all.py --only $only "$@" 2>&1 | tee "$OUT/bench_train.log" || status=1
    ;;
esac

tar czf "$OUT/results.tgz" benchmarks/results README.md || status=1
echo "results: $OUT/results.tgz (exit $status)"
exit $status
