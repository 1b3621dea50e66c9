#!/usr/bin/env bash
# The README's main command: install, then fine-tune the bundled base model offline with LoRA and with
# every weight, and print base vs LoRA vs full fine-tune (also in runs/quickstart/report.md and report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# offline: nothing is downloaded; idle OpenMP threads sleep rather than spin (a busy CPU stays fast)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
lorakit quickstart "$@"
