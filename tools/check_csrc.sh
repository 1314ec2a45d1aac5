#!/usr/bin/env bash
# Compile-check the CUDA C++ sources of csrc/ without a GPU.
#
# Every csrc/*.cu is compiled to an object file (-c) for sm_80 and sm_90a with the machine's
# nvcc (ptxas -v: a kernel that spills registers or has a stack frame fails the check), and
# every csrc/*.cpp (the torch binding) as host C++ through nvcc, all against the headers of
# the torch that the `python` on PATH imports. Nothing is linked or loaded, so a
# CPU-only torch wheel is enough; the JIT build on a GPU machine is sha_rnn_kernels/_cuda.py.
#
# Usage: bash tools/check_csrc.sh        (exit status != 0 when any file fails to compile)
# Env:   NVCC (default: nvcc on PATH), PYTHON (default: python), CSRC_ARCHS (default "80 90a"),
#        CSRC_OBJ_DIR (keep the objects and logs there; default: a temporary directory),
#        CSRC_ALLOW_SPILLS=1 (report spills without failing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
ARCHS="${CSRC_ARCHS:-80 90a}"

command -v "$NVCC" >/dev/null || { echo "check_csrc: $NVCC not found" >&2; exit 1; }

# Include dirs, the C++ standard torch builds extensions with, and whether the wheel lacks the
# generated c10/cuda macros header (CPU wheels do; the define below skips that include).
mapfile -t TORCH_INFO < <("$PYTHON" - <<'EOF'
import inspect
import os
import sysconfig

import torch.utils.cpp_extension as c

for path in c.include_paths():
    print("-I" + path)
print("-I" + sysconfig.get_paths()["include"])
print("-std=c++20" if "-std=c++20" in inspect.getsource(c) else "-std=c++17")
macros = os.path.join(c.include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
if not os.path.exists(macros):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
EOF
)

GENCODE=()
for arch in $ARCHS; do
  GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done

COMMON=(-c -O3 -DTORCH_EXTENSION_NAME=sha_rnn_lstm_check -DTORCH_API_INCLUDE_EXTENSION_H
        -I"$ROOT/csrc" "${TORCH_INFO[@]}")

# Object files and logs go to CSRC_OBJ_DIR when set (kept), else to a temporary directory.
if [ -n "${CSRC_OBJ_DIR:-}" ]; then
  OBJ_DIR="$CSRC_OBJ_DIR"
  mkdir -p "$OBJ_DIR"
else
  OBJ_DIR="$(mktemp -d)"
  trap 'rm -rf "$OBJ_DIR"' EXIT
fi

shopt -s nullglob
CU=("$ROOT"/csrc/*.cu)
CPP=("$ROOT"/csrc/*.cpp)
if [ ${#CU[@]} -eq 0 ]; then
  echo "check_csrc: no csrc/*.cu found under $ROOT" >&2
  exit 1
fi

echo "check_csrc: $("$NVCC" --version | tail -n 1)"
echo "check_csrc: torch headers: ${TORCH_INFO[0]#-I}"

# Compile in parallel; each job's log goes to its own file and is printed on failure.
pids=()
names=()
start=$SECONDS
for src in "${CU[@]}"; do
  name="$(basename "$src")"
  "$NVCC" "${COMMON[@]}" "${GENCODE[@]}" -Xptxas=-v "$src" -o "$OBJ_DIR/$name.o" \
    >"$OBJ_DIR/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name [nvcc sm_${ARCHS// /, sm_}]")
done
for src in "${CPP[@]}"; do
  name="$(basename "$src")"
  "$NVCC" "${COMMON[@]}" -Xcompiler -fPIC "$src" -o "$OBJ_DIR/$name.o" >"$OBJ_DIR/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name [host c++ via nvcc]")
done

# A kernel that spills registers or keeps a stack frame (ptxas -v: "N bytes stack frame, N bytes
# spill stores, N bytes spill loads" per kernel and target) fails the check: the persistent
# kernels budget every register (CSRC_ALLOW_SPILLS=1 reports without failing).
failed=0
for i in "${!pids[@]}"; do
  log="$OBJ_DIR/$(echo "${names[$i]}" | cut -d' ' -f1).log"
  if wait "${pids[$i]}"; then
    echo "check_csrc: compiled ${names[$i]}"
  else
    echo "check_csrc: FAILED ${names[$i]}" >&2
    failed=1
  fi
  if [ -s "$log" ]; then
    # Only the per-kernel summary lines (ptxas -v prints a few per kernel and target).
    grep -E "Compiling entry|stack frame|Used [0-9]+ registers|error|warning" "$log" \
      | sed 's/^/    /' || true
    clean="^ *0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    spills=$(grep -E "bytes stack frame" "$log" | grep -cvE "$clean" || true)
    if [ "$spills" -gt 0 ]; then
      echo "check_csrc: $spills kernel(s) of ${names[$i]} spill registers or use a stack frame" >&2
      [ "${CSRC_ALLOW_SPILLS:-0}" = "1" ] || failed=1
    fi
  fi
done
echo "check_csrc: $((${#CU[@]} + ${#CPP[@]})) file(s) in $((SECONDS - start)) s"
exit $failed
