#!/usr/bin/env bash
# lorakit's GPU figures on a bare CUDA machine, in one go (under 5 minutes on an H100-class GPU, most of it
# the install): the LoRA training step, lorakit vs PEFT in bf16, on the step benchmark's Llama (512 wide ×
# 8 layers) and on Llama 3.2 1B's shape (examples/configs/llama-3.2-1b, random weights), printing tokens/s,
# the ratio, and each side's peak GPU memory; then QLoRA's memory (benchmarks/qlora_memory.py: `lorakit
# train` on an NF4 vs a bf16 base of a ~1B Llama, peak GPU memory from torch.cuda.max_memory_allocated).
#
#     bash benchmarks/gpu.sh            # from the repository; a log goes to gpu-benchmark.log as well
#
# Installs into the active virtual environment, or creates .venv-gpu: PyPI's torch wheel for Linux is the
# CUDA build, so no index URL is needed. Versions are those the CPU figures were measured with.
set -euo pipefail
cd "$(dirname "$0")/.."
exec > >(tee gpu-benchmark.log) 2>&1
started=$SECONDS

command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi here; this script is for a CUDA machine"; exit 1; }
if [ -z "${VIRTUAL_ENV:-}" ]; then
  "${PYTHON:-python3}" -m venv .venv-gpu || { echo "gpu.sh: could not create .venv-gpu (on Debian/Ubuntu: apt install python3-venv), or activate a virtual environment first"; exit 1; }
  . .venv-gpu/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "gpu.sh: installing into $(python -c 'import sys; print(sys.prefix)')"
python -m pip install -q "torch==2.13.0" "transformers==5.24.0" "peft==0.21.2" "bitsandbytes==0.50.2" \
  "accelerate==1.16.0" "liger-kernel==0.8.5"
python -m pip install -q -e .
echo "gpu.sh: installed in $((SECONDS - started)) s"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device; this script is for a CUDA machine")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== step, lorakit vs PEFT, bf16: Llama 512 wide × 8 layers, vocab 32000, r=16 on all 7 projections, batch 4×256"
python benchmarks/lora_step_vs_peft.py --device cuda --precision bf16 --rounds 5 --steps 10
echo "== step, lorakit vs PEFT, bf16: Llama 3.2 1B's shape, batch 4×512"
python benchmarks/lora_step_vs_peft.py --device cuda --precision bf16 --model-config examples/configs/llama-3.2-1b \
  --seq 512 --rounds 3 --steps 5
echo "== QLoRA memory: lorakit train on an NF4 vs a bf16 base (~1B Llama, random weights)"
python benchmarks/qlora_memory.py --steps 3
echo "gpu.sh: done in $((SECONDS - started)) s"
