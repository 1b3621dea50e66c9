#!/usr/bin/env bash
# The controlled experiment on the bundled 4.2M-parameter model (longer than the quickstart): install, then
# LoRA vs full fine-tune vs base on the type-of-literal task (also in runs/quickstart/report.md and report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"  # the active venv's, as setup.sh
bash scripts/setup.sh
# offline: nothing is downloaded; idle OpenMP threads sleep rather than spin (a busy CPU stays fast)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PYTHON" -m lorakit quickstart --bundled "$@"
