"""lorakit: the whole LoRA lifecycle — checked data, LoRA/QLoRA training, PEFT-format adapters, evaluation,
merge."""

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
