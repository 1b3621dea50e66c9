#!/usr/bin/env bash
# Install lorakit with its test extras on a CPU machine, offline-friendly and without a CUDA torch.
# Elsewhere, point pip at PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) if torch==2.13.0 is not found.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c scripts/cpu-constraints.txt "torch==2.13.0"
python -m pip install -q -c scripts/cpu-constraints.txt -e ".[test]"
