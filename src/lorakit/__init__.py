"""lorakit: the whole LoRA lifecycle — checked data, LoRA/QLoRA training, PEFT-format adapters, evaluation,
merge."""

import os as _os

# Idle OpenMP threads sleep instead of spinning. GNU OpenMP (torch's on Linux) otherwise spins at every
# barrier, which on a CPU shared with another busy process starves both: lorakit train with default threads
# ran 8x slower than --threads 1 beside one busy process. Read once, when torch loads its OpenMP runtime,
# so it is set here, before anything below imports torch; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# --compile's kernels go to lorakit's cache (device.cache_root), reused by later runs. Set here too, since
# importing transformers' stack sets torch's default (/tmp/torchinductor_$USER) before train/compile.py runs.
_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _os.path.join(
    _os.path.expanduser(_os.environ.get("LORAKIT_CACHE", "~/.cache/lorakit")), "inductor"))

from lorakit.config import LoraConfig, RunConfig, load_config
from lorakit.errors import LorakitError
from lorakit.lora import (
    adapter_names,
    add_lora,
    count_parameters,
    disable_adapters,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    set_adapter_scale,
    unmerge,
)

__all__ = [
    "LoraConfig", "RunConfig", "load_config", "LorakitError",
    "add_lora", "adapter_names", "count_parameters", "disable_adapters", "load_adapter", "lora_parameters",
    "lora_state_dict", "merge", "merge_and_unload", "save_adapter", "set_adapter", "set_adapter_scale", "unmerge",
]
__version__ = "0.1.0"
