#!/usr/bin/env bash
# The GPU checks for a lent device machine, in two calls of under 10 minutes each (the `device`
# tool's `run`, from the repository root). That machine's image has torch and triton but not this
# package's other dependencies and no network, so everything runs from the source tree:
#
#   bash benchmarks/device_run.sh ops    # pytest -m gpu, then the op benchmarks
#   bash benchmarks/device_run.sh train  # train_step (toy and Wan-shaped) and the kernel report
#
# `train` needs diffusers: download its wheel here (`pip download diffusers --no-deps -d .wheels`,
# with .wheels in .git/info/exclude) and name .wheels in the run's `carry`. Logs and the result
# files come back packed in $OUT/results.tgz (the device tool returns at most 8 files); unpack it
# over the checkout and regenerate the README table with `python benchmarks/make_readme_table.py`.
# Extra arguments go to run_all.py (e.g. --quick for a dry run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
part=${1:-ops}
shift || true
status=0

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"

case "$part" in
  ops)
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_sde_ops.py tests/test_grpo_loss.py 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
    $PY benchmarks/run_all.py --only sde_step sde_log_prob reward_grad advantages grpo_loss "$@" 2>&1 \
      | tee "$OUT/bench_ops.log" || status=1
    ;;
  train)
    if [ -d .wheels ]; then $PY -m pip install -q --no-deps --no-index .wheels/*.whl || status=1; fi
    $PY benchmarks/run_all.py --only train_step kernel_report "$@" 2>&1 | tee "$OUT/bench_train.log" || status=1
    ;;
  *)
    echo "usage: bash benchmarks/device_run.sh ops|train [run_all.py arguments]" >&2
    exit 2
    ;;
esac

tar czf "$OUT/results.tgz" benchmarks/results README.md
echo "results: $OUT/results.tgz (exit $status)"
exit $status
