#!/usr/bin/env bash
# One visit to a lent GPU machine, as a single command (see README, Performance):
#   1. the GPU parity tests (TRITON_INTERPRET=0: the same parity tests run on CUDA tensors,
#      the GPU-only paper-shape tests and the CUDA C++ LSTM build and parity run too);
#   2. the benchmarks of the chosen ops at the paper shapes (results merge into
#      benchmarks/results/<device>.json, so several visits can each take a few ops).
# Usage: OPS=lstm,attention bash benchmarks/gpu_visit.sh   (TESTS=0 skips step 1, BENCH=0 step 2)
# Everything worth keeping lands in $OUT (the device tool's folder) as logs and one tarball.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export SHA_RNN_KERNELS_BUILD_DIR="${SHA_RNN_KERNELS_BUILD_DIR:-/tmp/sha_rnn_kernels_build}"
OUT="${OUT:-/tmp/sha_rnn_kernels_out}"
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv \
    | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if [ "${TESTS:-1}" != 0 ]; then
    # The training tests are CPU tests (gloo DDP, resume); they gain nothing from the GPU.
    python -m pytest tests -q -x -p no:cacheprovider --durations=10 \
        --ignore=tests/test_train.py --ignore=tests/test_data.py 2>&1 | tee "$OUT/gpu_tests.log" \
        | tail -40
    status=${PIPESTATUS[0]}
fi

if [ "${BENCH:-1}" != 0 ]; then
    python benchmarks/run.py --ops "${OPS:-lstm,attention,boom}" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench.log" | tail -60
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    tar czf "$OUT/results.tgz" benchmarks/results
fi
exit "$status"
