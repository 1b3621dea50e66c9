"""The LoRA engine: layers, injection, merge, PEFT-format I/O."""

from lorakit.lora.inject import (
    adapter_names,
    add_lora,
    count_parameters,
    disable_adapters,
    lora_layers,
    lora_parameters,
    set_adapter,
    set_adapter_scale,
)
from lorakit.lora.io import load_adapter, lora_state_dict, read_adapter, save_adapter
from lorakit.lora.merge import merge, merge_and_unload, unmerge

__all__ = [
    "add_lora", "adapter_names", "count_parameters", "disable_adapters", "lora_layers", "lora_parameters",
    "set_adapter", "set_adapter_scale", "load_adapter", "lora_state_dict", "read_adapter", "save_adapter",
    "merge", "merge_and_unload", "unmerge",
]
