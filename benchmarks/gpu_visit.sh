#!/usr/bin/env bash
# A GPU verdict in at most nine minutes: check and measure sha_rnn_kernels on a CUDA machine.
#
# Usage: bash benchmarks/gpu_visit.sh [--dry-run] [OUTDIR]     (OUTDIR default: benchmarks/results)
#
# Phases, most important first, each under `timeout` with its own cap (seconds; defaults sum
# to 540 s; README.md "A GPU visit" gives the estimate behind each):
#   facts      GPU, driver, clocks, torch/triton/CUDA/cuDNN versions     VISIT_CAP_FACTS=15
#   build      csrc/ (the persistent CUDA LSTM), started at once in the
#              background so that it overlaps the phases after it        VISIT_CAP_BUILD=300
#   check      python -m sha_rnn_kernels.check: every kernel, dtype and
#              backend against PyTorch, the paper's LSTM shape            VISIT_CAP_CHECK=120
#   tests      the GPU parity tests chosen below (TRITON_INTERPRET=0)      VISIT_CAP_TESTS=110
#   paths      small-shape parity tests that reach the other launch paths
#              (chunked attention, detached keys, narrow Boom, odd LSTMs)  VISIT_CAP_PATHS=40
#   sanitizer  compute-sanitizer memcheck, racecheck and synccheck on
#              the persistent LSTM at a small shape ("refused" when the
#              machine forbids it)                                          VISIT_CAP_SANITIZER=60
#   speed      the paper's shape, bf16 then fp16, training config: our
#              LSTM vs cuDNN, attention vs SDPA, Boom, one layer, the
#              epoch estimate (each row written the moment it is timed)    VISIT_CAP_SPEED=110
#   compile    the torch.compile baselines of attention and the Boom in
#              bf16 (VISIT_COMPILE_DTYPES="bf16 fp16" adds fp16)            VISIT_CAP_COMPILE=75
#   report     the speed-of-light report joined with the rows             VISIT_CAP_REPORT=10
# (the build's cap is not in the sum: it runs beside the others).
#
# After every phase, OUTDIR/gpu-visit-<UTC date>-<gpu>.tar.gz is rewritten (a temporary name,
# then a rename): summary.md (a verdict per phase with its reason, the check table, the
# measured table), phases.json, the results JSON and every phase's log. A visit killed at any
# moment leaves the archive of the phases it finished. OUTDIR also receives the results
# <device>.json (rewritten after every row, merged with the rows already there) and .md: at
# most three files of the visit there.
#
# --dry-run runs every phase on the CPU through the Triton interpreter at tiny shapes (the build
# and the sanitizer are skipped with that reason) and writes the same layout; CI runs it.
#
# Variables: VISIT_CAP_<PHASE> (above; a dry run triples each default); VISIT_PHASES=facts,check
# (a subset, run in the order above); VISIT_TESTS / VISIT_PATH_TESTS (pytest arguments of the
# tests and paths phases); VISIT_OPS / VISIT_COMPILE_OPS / VISIT_COMPILE_DTYPES (what the speed
# and compile phases time); BENCH_ARGS (more arguments for benchmarks/run.py); VISIT_WORK (the
# working folder, default a new temporary one). Exit status: 0 when no phase failed or timed
# out, 1 otherwise, 2 on bad arguments.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

# The GPU parity tests of the tests phase. The check phase has already run every op in bf16,
# fp16 and fp32 on the Triton and CUDA backends; these add: the paper-shape tests of every op
# (-m gpu: the Boom's two designs with and without dropout, which autotune the fused kernel at
# 16384 rows and so launch every config its prune keeps there; attention in training at K=5000;
# the Triton and CUDA LSTMs at T=1024, B=16, and the CUDA LSTM's odd shapes, CUDA graphs and
# threads), and tests/test_launch_configs.py, which forces every autotune config of the fused
# Boom kernel one at a time against float64 (autotuning times configs, it checks none). The
# torch.compile tests are left out (Inductor compiles for ~30 s each; the compile phase times
# torch.compile). VISIT_TESTS replaces this list (shell words: quotes group).
GPU_TESTS="tests/test_launch_configs.py tests/test_boom.py tests/test_attention.py \
tests/test_lstm.py tests/test_lstm_cuda.py -m gpu -k 'not compile'"
# The paths phase: the launch paths the paper shape does not take, at small odd shapes: the
# attention's chunked (recomputing) backward and detached memory keys, the Boom's narrow (E = 1,
# 2) tiles in both designs, the Triton LSTM at B = 1 and odd sizes in fp32, fp16 and bf16.
PATH_TESTS="tests/test_attention.py tests/test_boom.py tests/test_lstm.py -k 'parity_chunked \
or detached_keys_parity or narrow_and_single_row or fp32_matches_torch_lstm or lstm_low_precision'"
# The dry run's: the interpreter parity of one op at tiny shapes, in seconds.
DRY_TESTS="tests/test_boom.py -k test_parity_without_bias"
DRY_PATH_TESTS="tests/test_lstm.py -k 'fp32_matches_torch_lstm and 1-1-16-20'"

die() { echo "gpu_visit.sh: $*" >&2; exit 2; }

# --------------------------------------------------------------------------------------------
# One phase, run as `bash gpu_visit.sh __phase NAME` under `timeout` by the main flow below.
# Exit 0 passed, 1 failed, 77 skipped, 78 refused; the reason goes to $WORK/reason.NAME.
# --------------------------------------------------------------------------------------------
skip() { echo "$1" > "$WORK/reason.$PHASE"; echo "skipped: $1"; exit 77; }

phase_facts() {
    python benchmarks/visit.py facts
}

phase_build() {
    [ "$DRY" = 1 ] && skip "dry run: the CUDA build needs a CUDA device and nvcc"
    SHA_RNN_KERNELS_VERBOSE_BUILD=1 python -c "import torch, time; \
from sha_rnn_kernels import _cuda; t = time.time(); \
_cuda.load_extension(torch.device('cuda')); print(f'built in {time.time() - t:.0f} s')"
}

phase_check() {
    if [ "$DRY" = 1 ]; then
        TRITON_INTERPRET=1 python -m sha_rnn_kernels.check
    else
        python -m sha_rnn_kernels.check
    fi
}

pytest_words() {  # pytest_words VARIABLE_NAME WORDS: pytest on a string of shell words
    local args
    eval "args=($2)" || { echo "$1: not a list of shell words: $2"; exit 1; }
    python -m pytest "${args[@]}" -q -p no:cacheprovider -rfEs --durations=10
}

phase_tests() {
    if [ "$DRY" = 1 ]; then
        pytest_words VISIT_TESTS "${VISIT_TESTS:-$DRY_TESTS}"
    else
        pytest_words VISIT_TESTS "${VISIT_TESTS:-$GPU_TESTS}"
    fi
}

phase_paths() {
    if [ "$DRY" = 1 ]; then
        pytest_words VISIT_PATH_TESTS "${VISIT_PATH_TESTS:-$DRY_PATH_TESTS}"
    else
        pytest_words VISIT_PATH_TESTS "${VISIT_PATH_TESTS:-$PATH_TESTS}"
    fi
}

phase_sanitizer() {
    [ "$DRY" = 1 ] && skip "dry run: compute-sanitizer needs a CUDA device"
    local sanitizer
    sanitizer="$(command -v compute-sanitizer || true)"
    for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                     /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [ -z "$sanitizer" ] && [ -x "$candidate" ] && sanitizer="$candidate"
    done
    [ -n "$sanitizer" ] || skip "compute-sanitizer is not installed (not on PATH nor in CUDA_HOME)"
    # Without the build phase (VISIT_PHASES) the smoke run builds the extension itself.
    if [ -f "$WORK/build.rc" ] && [ "$(cat "$WORK/build.rc")" != 0 ]; then
        skip "the CUDA build failed (logs/build.log)"
    fi
    local tool rc out status=0 each=$(( PHASE_CAP / 3 - 2 ))
    [ "$each" -ge 1 ] || each=1
    for tool in memcheck racecheck synccheck; do
        out="$WORK/logs/sanitizer-$tool.txt"
        # The smoke run of sha_rnn_kernels._cuda: T=5, B=3, 24 -> 40, fp16 and bf16, forward and
        # backward. Only this library's kernels are instrumented (kns: name substring); no
        # caching allocator, so that an overrun past a tensor is outside any allocation.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$each" "$sanitizer" --tool "$tool" \
            --kernel-name kns=lstm_ --error-exitcode 9 python -m sha_rnn_kernels._cuda > "$out" 2>&1
        rc=$?
        if grep -qiE "unrecognized option|unknown option|invalid option" "$out"; then
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$each" "$sanitizer" --tool "$tool" \
                --error-exitcode 9 python -m sha_rnn_kernels._cuda > "$out" 2>&1
            rc=$?
        fi
        echo "== $tool (exit $rc)"; tail -5 "$out"
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            echo "$tool: timed out after ${each} s"; status=1
        elif grep -q "ERROR SUMMARY: 0 errors" "$out" && [ "$rc" = 0 ]; then
            :
        elif grep -qiE "permission|not supported|insufficient|ERR_NVGPUCTRPERM|unable to (attach|create|initialize)" "$out"; then
            echo "$tool: refused by this machine" > "$WORK/reason.$PHASE"; [ "$status" = 0 ] && status=78
        else
            echo "$tool: $(grep -m1 "ERROR SUMMARY" "$out" || echo "exit $rc")"; status=1
        fi
    done
    exit "$status"
}

# One benchmarks/run.py call per dtype, so that bf16's rows of every op come before fp16's.
bench() {  # bench OPS IMPLS DTYPES
    local ops="$1" impls="$2" dtype status=0 args
    [ -n "$ops" ] || skip "no ops chosen"
    for dtype in $3; do
        if [ "$DRY" = 1 ]; then
            args="--small --device cpu --rep-ms 5 --min-reps 2 --warmup 1"
        else
            args=""
        fi
        # shellcheck disable=SC2086  # lists of arguments
        python benchmarks/run.py --ops "$ops" --impls "$impls" --dtypes "$dtype" --passes fwd+bwd \
            --results-dir "$OUTDIR" --out "$STEM" --no-plot --loss-steps 0 $args ${BENCH_ARGS:-} \
            || status=1
    done
    return "$status"
}

phase_speed() {
    bench "${VISIT_OPS-lstm,attention,boom,layer,epoch}" "sha_rnn_kernels,cudnn,sdpa,original" \
        "$DTYPES"
}

phase_compile() {
    # Inductor on the CPU compiles C++ for minutes: the dry run compiles the Boom only. On the
    # GPU bf16 only by default: Inductor takes 20-40 s per op and dtype (VISIT_COMPILE_DTYPES).
    local ops=attention,boom dtypes="${VISIT_COMPILE_DTYPES:-bf16}"
    [ "$DRY" = 1 ] && ops=boom dtypes="$DTYPES"
    bench "${VISIT_COMPILE_OPS-$ops}" compile "$dtypes"
}

phase_report() {
    [ -f "$OUTDIR/$STEM.json" ] || skip "no results to report on"
    python benchmarks/roofline.py --gpu "$ROOFLINE_GPU" --results-dir "$OUTDIR" --markdown
}

if [ "${1:-}" = "__phase" ]; then
    PHASE="$2"
    cd "$REPO" || exit 1
    "phase_$PHASE"
    exit $?
fi

# --------------------------------------------------------------------------------------------
# The main flow
# --------------------------------------------------------------------------------------------
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (expected --dry-run, --help or OUTDIR)" ;;
        *) break ;;
    esac
done
[ $# -le 1 ] || die "expected one OUTDIR at most; got $# arguments: $*"
OUTDIR="${1:-$REPO/benchmarks/results}"
mkdir -p "$OUTDIR" || die "cannot create OUTDIR $OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="${VISIT_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-visit.XXXXXX")}"
mkdir -p "$WORK/logs" || die "cannot create VISIT_WORK $WORK"
rm -f "$WORK/phases.tsv" "$WORK"/reason.* "$WORK"/build.*

ALL_PHASES="facts build check tests paths sanitizer speed compile report"
PHASES=",${VISIT_PHASES:-${ALL_PHASES// /,}},"
for name in ${PHASES//,/ }; do
    case " $ALL_PHASES " in *" $name "*) ;; *) die "VISIT_PHASES: unknown phase $name (choose from $ALL_PHASES)" ;; esac
done
# The default caps are an H100 host's; a dry run on a small CPU gets three times as long.
scale=1
[ "$DRY" = 1 ] && scale=3
declare -A CAP=()
for pair in facts:15 build:300 check:120 tests:110 paths:40 sanitizer:60 speed:110 compile:75 \
            report:10; do
    name="${pair%%:*}" variable="VISIT_CAP_${pair%%:*}"
    variable="${variable^^}"
    CAP[$name]="${!variable:-$(( ${pair##*:} * scale ))}"
done
for name in $ALL_PHASES; do
    [[ "${CAP[$name]}" =~ ^[1-9][0-9]*$ ]] || die "VISIT_CAP_${name^^} must be a whole number of seconds >= 1; got '${CAP[$name]}'"
done

if [ "$DRY" = 1 ]; then
    GPU=cpu STEM=cpu-smoke DTYPES="fp32" ROOFLINE_GPU=h100
    export TRITON_INTERPRET=1
else
    command -v nvidia-smi > /dev/null || die "nvidia-smi not found: no CUDA machine? (--dry-run runs on the CPU)"
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    [ -n "$GPU_NAME" ] || die "nvidia-smi lists no GPU"
    # The stem benchmarks/harness.py's file_stem gives the same device name.
    STEM="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')"
    GPU="$(echo "$STEM" | sed 's/^nvidia-//')"
    DTYPES="bf16 fp16"
    case "$GPU_NAME" in *H200*) ROOFLINE_GPU=h200 ;; *A100*) ROOFLINE_GPU=a100 ;; *) ROOFLINE_GPU=h100 ;; esac
    export TRITON_INTERPRET=0
fi
ARCHIVE="$OUTDIR/gpu-visit-$(date -u +%Y-%m-%d)-$GPU.tar.gz"
export WORK OUTDIR DRY STEM DTYPES ROOFLINE_GPU PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 1
rm -f "$OUTDIR"/.gpu-visit-*.partial  # a packer killed mid-write in an earlier visit
echo "gpu_visit: $([ "$DRY" = 1 ] && echo "dry run, ")archive $ARCHIVE, logs in $WORK/logs"

selected() { case "$PHASES" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

pack() {
    local title="GPU visit $(date -u +%Y-%m-%d) on ${GPU_NAME:-the CPU (dry run)}"
    python benchmarks/visit.py pack --work "$WORK" --archive "$ARCHIVE" --title "$title" \
        --results "$OUTDIR/$STEM.json" --planned "${PHASES:1:-1}" $([ "$DRY" = 1 ] && echo --dry-run) \
        >> "$WORK/logs/pack.log" 2>&1 || echo "gpu_visit: packing the archive failed (logs/pack.log)"
}

FAILED=0
record() {  # record NAME RC SECONDS
    local name="$1" rc="$2" verdict reason=""
    case "$rc" in
        0) verdict=passed ;;
        124|137) verdict="timed out"; reason="over its cap of ${CAP[$name]} s (VISIT_CAP_${name^^})" ;;
        77) verdict=skipped ;;
        78) verdict=refused ;;
        143|130) verdict=interrupted; reason="the visit was stopped (signal) during this phase" ;;
        *) verdict=failed ;;
    esac
    [ -f "$WORK/reason.$name" ] && reason="$(head -c 300 "$WORK/reason.$name" | tr '\t\n' '  ' | sed 's/ *$//')"
    case "$verdict" in failed|"timed out") FAILED=1 ;; esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$3" "${CAP[$name]}" "$name.log" "$reason" \
        >> "$WORK/phases.tsv"
    echo "== $name: $verdict ($3 s of ${CAP[$name]})${reason:+: $reason}"
    if [ "$verdict" = failed ] || [ "$verdict" = "timed out" ]; then tail -15 "$WORK/logs/$name.log"; fi
}

CURRENT="" CURRENT_PID="" CURRENT_START=0 BUILD_PID="" BUILD_EPOCH=0
run_phase() {  # run_phase NAME: in the foreground, under its cap
    local name="$1"
    selected "$name" || return 0
    echo "-- $name (cap ${CAP[$name]} s)"
    CURRENT="$name" CURRENT_START=$SECONDS
    PHASE_CAP="${CAP[$name]}" timeout -k 10 "${CAP[$name]}" bash "$SELF" __phase "$name" > "$WORK/logs/$name.log" 2>&1 &
    CURRENT_PID=$!
    wait "$CURRENT_PID"
    local rc=$?
    CURRENT="" CURRENT_PID=""
    record "$name" "$rc" $((SECONDS - CURRENT_START))
    pack
}

start_build() {
    selected build || return 0
    BUILD_EPOCH=$(date +%s)
    # timeout's own pid goes to build.pid: a stopped visit stops the build through it (timeout
    # runs the build in a process group of its own, which a signal to this subshell misses).
    ( PHASE_CAP="${CAP[build]}" timeout -k 10 "${CAP[build]}" bash "$SELF" __phase build \
          > "$WORK/logs/build.log" 2>&1 &
      echo $! > "$WORK/build.pid"
      wait $!
      echo "$? $(( $(date +%s) - BUILD_EPOCH ))" > "$WORK/build.done"
      cut -d' ' -f1 "$WORK/build.done" > "$WORK/build.rc" ) &
    BUILD_PID=$!
    echo "-- build started in the background (cap ${CAP[build]} s)"
}

finish_build() {  # wait for the background build (within its own cap) and record it once
    [ -n "$BUILD_PID" ] || return 0
    wait "$BUILD_PID"
    BUILD_PID=""
    local rc seconds  # the build's own time, not the wait for it
    read -r rc seconds < "$WORK/build.done" || { rc=1; seconds=$(( $(date +%s) - BUILD_EPOCH )); }
    record build "$rc" "$seconds"
    pack
}

on_signal() {
    trap - TERM INT HUP
    echo "gpu_visit: stopped by a signal${CURRENT:+ during $CURRENT}"
    [ -n "$CURRENT_PID" ] && kill -TERM "$CURRENT_PID" 2> /dev/null
    if [ -n "$BUILD_PID" ] && [ -f "$WORK/build.pid" ]; then
        kill -TERM "$(cat "$WORK/build.pid")" 2> /dev/null
    fi
    [ -n "$CURRENT" ] && record "$CURRENT" 143 $((SECONDS - CURRENT_START))
    [ -n "$BUILD_PID" ] && [ ! -f "$WORK/build.done" ] && record build 143 $(( $(date +%s) - BUILD_EPOCH ))
    pack
    exit 143
}
trap on_signal TERM INT HUP

run_phase facts
start_build
run_phase check
run_phase tests
run_phase paths
finish_build
run_phase sanitizer
run_phase speed
run_phase compile
run_phase report
[ -f "$ARCHIVE" ] || pack  # every phase packs; this is for a VISIT_PHASES that ran none
echo "gpu_visit: done in $SECONDS s; archive $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
[ "$FAILED" = 0 ]
