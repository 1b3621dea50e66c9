#!/usr/bin/env bash
# The README's main command: install, then fine-tune SmolLM2-135M-Instruct (its GGUF file) offline with LoRA, with
# every weight and with QLoRA, and print them against the base (also in runs/smollm2-pirate/report.md and .json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"  # the active venv's, as setup.sh
bash scripts/setup.sh
# offline: nothing is downloaded; idle OpenMP threads sleep rather than spin (a busy CPU stays fast)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PYTHON" -m lorakit quickstart "$@"
