#!/usr/bin/env bash
# Check and measure sha_rnn_kernels on a CUDA machine in one command:
#   1. the GPU parity tests (TRITON_INTERPRET=0: the parity tests run on CUDA tensors, and the
#      GPU-only paper-shape tests and the CUDA C++ LSTM build and parity run too);
#   2. the benchmarks of the chosen ops at the paper's shapes, written to RESULTS_DIR as
#      <device>.json/.md/.png (rows merge with a file already there, so several runs can each
#      take a few ops);
#   3. the speed-of-light report of that GPU joined with those results.
#
# Usage: bash benchmarks/gpu_visit.sh [RESULTS_DIR]       (default: benchmarks/results)
#   OPS=lstm,attention,boom,layer,epoch   ops to benchmark (default: all of them)
#   TESTS=0 / BENCH=0                     skip step 1 / step 2
#   BENCH_ARGS="--sweep"                  more arguments for benchmarks/run.py
# Logs (gpu.txt, tests.log, bench.log, roofline.md) go to RESULTS_DIR/logs. The exit status is
# non-zero when a test or a benchmark configuration failed.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS_DIR="$(mkdir -p "${1:-$REPO/benchmarks/results}" && cd "${1:-$REPO/benchmarks/results}" && pwd)"
LOGS="$RESULTS_DIR/logs"
mkdir -p "$LOGS"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv \
    | tee "$LOGS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__)" | tee -a "$LOGS/gpu.txt"

if [ "${TESTS:-1}" != 0 ]; then
    # The training tests are CPU tests (gloo DDP, resume); they gain nothing from the GPU.
    python -m pytest tests -q -x -p no:cacheprovider --durations=10 \
        --ignore=tests/test_train.py --ignore=tests/test_data.py 2>&1 | tee "$LOGS/tests.log" \
        | tail -40
    status=${PIPESTATUS[0]}
fi

if [ "${BENCH:-1}" != 0 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    python benchmarks/run.py --ops "${OPS:-lstm,attention,boom,layer,epoch}" \
        --results-dir "$RESULTS_DIR" ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench.log" | tail -60
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
case "$gpu_name" in
    *H200*) gpu=h200 ;;
    *A100*) gpu=a100 ;;
    *) gpu=h100 ;;
esac
python benchmarks/roofline.py --gpu "$gpu" --results-dir "$RESULTS_DIR" --markdown \
    | tee "$LOGS/roofline.md"
exit "$status"
