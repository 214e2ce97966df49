#!/usr/bin/env bash
# One short check of the CUDA paths on a machine with a GPU (CI has none). Installs the
# project into the machine's own Python without touching the network, then runs the tests
# marked `gpu`, the whole suite with CUDA present, and bench/cuda_kernels.py.
#
#     bash bench/gpu_check.sh [LOGDIR]      # logs to LOGDIR (default: ./gpu-check)
#     SKIP_BENCH=1 bash bench/gpu_check.sh  # tests only
#     SUITE='tests/plugins' bash bench/gpu_check.sh   # fewer paths for the last step
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu-check}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -m monoquant_core env 2>&1 | tee "$LOG/env.txt"
echo "== tests marked gpu"
"$PY" -m pytest -p no:cacheprovider -q -rA -m gpu tests 2>&1 | tail -60 | tee "$LOG/gpu-tests.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== bench/cuda_kernels.py"
  timeout 180 "$PY" bench/cuda_kernels.py 2>&1 | tee "$LOG/cuda-kernels.md"
fi
echo "== the suite (or \$SUITE's paths) with CUDA present"
# shellcheck disable=SC2086
timeout "${SUITE_TIMEOUT:-300}" "$PY" -m pytest -p no:cacheprovider -q -n 8 -m "not slow" \
  ${SUITE:-tests} 2>&1 | tail -25 | tee "$LOG/suite.txt"
