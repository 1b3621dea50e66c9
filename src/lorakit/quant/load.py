"""Load a causal LM with its linear layers quantized as they are read: QLoRA's frozen base.

The model is built with every parameter on the meta device (no memory, no init), then the checkpoint is
read one tensor at a time from its safetensors shards (``model.safetensors.index.json`` honoured), and each
linear weight is quantized the moment it is read. Peak memory is the quantized model plus one 16-bit tensor
and its quantization temporaries: the 16-bit model is never whole in memory.

Quantized: every ``nn.Linear`` but the output head (QLoRA keeps embeddings, norms and lm_head in 16-bit)
and those whose shape the kernels refuse (``unquantizable``); the report lists what stayed 16-bit and why.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.lora.targets import output_head_names
from lorakit.quant.bnb import (
    NF4_BITS,
    empty_quantized_linear,
    set_quantized_weight,
    storage_bytes,
    unquantizable,
)

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, musl): their allocators return large blocks anyway
    _LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class LoadReport:
    """What ``load_quantized`` did: which linears are quantized, which stayed 16-bit and why, the bytes."""

    quantization: str
    quantized: list[str] = field(default_factory=list)  # module paths stored as NF4 / int8
    kept: dict[str, str] = field(default_factory=dict)  # linear module path -> why it stayed 16-bit
    quantized_params: int = 0
    quantized_bytes: int = 0  # packed weights + their quantization constants
    other_params: int = 0  # embeddings, norms, output head, kept linears, biases (16-bit)
    other_bytes: int = 0
    checkpoint_bytes: int = 0  # the tensors read from the checkpoint
    largest_tensor_bytes: int = 0  # the most checkpoint bytes held at once: one tensor
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for

    @property
    def base_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.base_bytes / max(1, self.quantized_params + self.other_params)

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(1, self.quantized_params)

    def summary(self) -> str:
        ideal = NF4_BITS if self.quantization == "nf4" else 8.0
        lines = [f"{self.quantization}: {len(self.quantized)} linear layers quantized "
                 f"({self.quantized_bits_per_weight:.3f} bits/weight, ideal {ideal:.3f}); frozen base "
                 f"{_size(self.base_bytes)} ({self.bytes_per_param:.3f} B/param) from a {_size(self.checkpoint_bytes)} "
                 f"checkpoint read one tensor at a time (the largest {_size(self.largest_tensor_bytes)})"]
        for path, why in self.kept.items():
            lines.append(f"  kept 16-bit: {path} ({why})")
        if self.unexpected:
            lines.append(f"  ignored checkpoint keys the model does not have: {', '.join(self.unexpected[:5])}"
                         + (f" and {len(self.unexpected) - 5} more" if len(self.unexpected) > 5 else ""))
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def load_quantized(path: str | Path, quantization: str, dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cpu") -> tuple[PreTrainedModel, LoadReport]:
    """(model in eval mode on ``device``, report): the causal LM in folder ``path`` with its linears stored
    as ``quantization`` (nf4 or int8) and everything else in ``dtype``, read tensor by tensor."""
    if quantization not in ("nf4", "int8"):
        raise LorakitError(f"--quantization must be nf4 or int8 to load a quantized base, got {quantization!r}")
    folder = _local_folder(path)
    device = torch.device(device)
    _unmap_large_blocks_on_free()
    shards = checkpoint_shards(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LorakitError(f"{folder}/config.json: not a usable model config ({e})") from None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    report = LoadReport(quantization)
    report.quantized, report.kept = plan(model, quantization)
    for p in report.quantized:
        _set_submodule(model, p, empty_quantized_linear(model.get_submodule(p), quantization, dtype))
    for m in model.modules():  # buffers (RoPE tables) were built on the CPU
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)

    names = _tensor_names(model)
    quantized = set(report.quantized)
    for file, keys in shards:
        for key in keys:
            name = _resolve(key, names, model.base_model_prefix)
            if name is None:
                report.unexpected.append(key)
                continue
            # opened per tensor: a mapping held across a shard keeps every page it has read resident
            with safe_open(file, framework="pt", device=str(device)) as f:
                tensor = f.get_tensor(key)
            nbytes = tensor.numel() * tensor.element_size()
            report.checkpoint_bytes += nbytes
            report.largest_tensor_bytes = max(report.largest_tensor_bytes, nbytes)
            module_path, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_path)
            if module_path in quantized and leaf == "weight":
                set_quantized_weight(module, tensor.to(dtype))
            else:
                _set_tensor(module, leaf, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            del tensor

    model.tie_weights()  # a tied lm_head is absent from the checkpoint: it shares the embedding again
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise LorakitError(f"{folder}: the checkpoint lacks {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                           + "; is it the checkpoint of this config.json's model?")
    _count(model, quantized, report)
    model.config._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval(), report


def _local_folder(name: str | Path) -> Path:
    """A local model folder as is; a hub id -> its snapshot's folder (the hub cache, or a download)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, no access: all mean "not loadable here"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorakitError(f"--model {name}: not a local folder, and no hub snapshot of it ({first})") from None


def plan(model: nn.Module, quantization: str) -> tuple[list[str], dict[str, str]]:
    """(linear module paths to quantize, {linear path: why it stays 16-bit})."""
    heads = output_head_names(model)
    quantize, kept = [], {}
    for path, m in model.named_modules():
        if isinstance(m, Conv1D):
            kept[path] = "GPT-2 Conv1D layout, not a bitsandbytes linear"
        elif type(m) is nn.Linear:
            reason = "output head (QLoRA keeps it 16-bit)" if path in heads else unquantizable(m, quantization)
            if reason:
                kept[path] = reason
            else:
                quantize.append(path)
    return quantize, kept


def checkpoint_shards(folder: Path) -> list[tuple[Path, list[str]]]:
    """[(safetensors file, its tensor keys)] of a model folder: the index's shards, or the single file."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LorakitError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, []).append(key)
        for name in by_file:
            if not (folder / name).is_file():
                raise LorakitError(f"{index}: names shard {name}, which is not in {folder}")
        return [(folder / name, keys) for name, keys in sorted(by_file.items())]
    single = folder / SINGLE_NAME
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return [(single, list(f.keys()))]
        except (SafetensorError, OSError) as e:
            raise LorakitError(f"{single}: not a readable safetensors file ({e})") from None
    if any(folder.glob("pytorch_model*.bin")):
        raise LorakitError(f"{folder}: only pickled pytorch_model*.bin weights, which lorakit never unpickles; "
                           "re-save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    raise LorakitError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}; --quantization reads a local safetensors "
                       "checkpoint (a Hugging Face model folder)")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside are moved to the meta device as they are registered: no memory, and
    init on meta does nothing. Buffers stay real, because RoPE's inv_freq and the like are computed in
    ``__init__`` and are not in the checkpoint (plain ``torch.device("meta")`` would lose them)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _unmap_large_blocks_on_free() -> None:
    """Pin glibc's mmap threshold at its initial 128 KiB: every larger block gets its own mapping, returned
    to the OS when freed. By default glibc raises the threshold each time such a block is freed (up to
    32 MiB); from then on the quantizer's temporaries and the weights dequantized for every matmul come
    from its heap, interleave with the small quantization constants that stay, and their holes stay
    resident: RSS grows with the number of layers instead of the largest one (measured on a 4-layer,
    2048-wide Llama: +260 MiB over loading and two training steps; a 1B model: +800 MiB). Process-wide:
    a process that loads a quantized base is there to save memory."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 << 10)


def _tensor_names(model: nn.Module) -> set[str]:
    """Parameter names (tied ones under each name) and persistent buffer names: what a checkpoint holds."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} | set(model.state_dict(keep_vars=True))


def _resolve(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint ``key``; a base-model checkpoint lacks the ``model.`` prefix."""
    for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if candidate in names:
            return candidate
    return None


def _set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    else:
        module._buffers[leaf] = value


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _count(model: nn.Module, quantized: set[str], report: LoadReport) -> None:
    seen: set[int] = set()
    for path, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if path in quantized and leaf == "weight":
                report.quantized_params += module.in_features * module.out_features
                report.quantized_bytes += storage_bytes(p, module)
            else:
                report.other_params += p.numel()
                report.other_bytes += p.numel() * p.element_size()
