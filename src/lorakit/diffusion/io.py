"""Text-to-image adapter files on disk: write a trained adapter, read one in any layout (see ``formats``).

    OUTPUT/pytorch_lora_weights.safetensors   diffusers' layout and header: pipe.load_lora_weights(OUTPUT)
    OUTPUT/adapter_config.json                the denoiser's PEFT LoraConfig (base_model_name_or_path: the pipeline)
    OUTPUT/lora_kohya.safetensors             with --kohya: the kohya/A1111 layout

Adapter files are untrusted: safetensors and JSON only, never a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.diffusion.formats import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    alphas_from_metadata,
    from_kohya,
    is_kohya,
    lora_tensors,
    peft_config,
    ranks,
    to_diffusers_metadata,
    to_kohya,
)
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic
from lorakit.lora.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_config


def save_lora(folder: str | Path, components: dict[str, nn.Module], denoiser: str, name: str = "default",
              base_model: str | None = None, kohya: bool = False, sdxl: bool = False) -> None:
    """Write adapter ``name`` of ``components`` (by pipeline component name) into ``folder``, atomically."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state, alphas = lora_tensors(components, name)
    write_atomic(out / DIFFUSERS_FILE, lambda p: save_file(state, str(p), metadata=to_diffusers_metadata(state, alphas)))
    # adapter_config.json as PEFT writes it for the denoiser alone: PeftModel.from_pretrained(pipe.unet, ...)
    # reads it with adapter_model.safetensors; diffusers reads the same config from the weights' header
    config = {**adapter_config(components[denoiser], name, base_model), **peft_config(state, alphas, denoiser)}
    write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    if kohya:
        write_kohya(out / KOHYA_FILE, state, alphas, sdxl)


def write_kohya(path: str | Path, state: dict[str, Tensor], alphas: dict[str, float], sdxl: bool) -> None:
    r = max(ranks(state).values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(r),
            "ss_network_alpha": str(max(alphas.values())), "format": "pt"}
    kohya = to_kohya(state, alphas, sdxl)
    write_atomic(path, lambda p: save_file(kohya, str(p), metadata=meta))


def adapter_file(path: str | Path) -> Path:
    """The weights file of an adapter given as a file or a folder (diffusers', else PEFT's file in it)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise LorakitError(f"--adapter {path}: no such file or folder")
    for name in (DIFFUSERS_FILE, WEIGHTS_NAME):
        if (p / name).is_file():
            return p / name
    if any(p.glob("*.bin")):
        raise LorakitError(f"--adapter {path}: only pickled .bin weights here; lorakit reads safetensors only "
                           "(untrusted files are never unpickled)")
    raise LorakitError(f"--adapter {path}: no {DIFFUSERS_FILE} or {WEIGHTS_NAME} in this folder")


def read_file(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, with a one-line error for a bad one."""
    try:
        state = load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LorakitError(f"{file}: not a readable safetensors file ({e})") from None
    if not state:
        raise LorakitError(f"{file}: holds no tensors")
    return state, metadata


def read_diffusers(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], Path]:
    """(state, alphas, file) of an adapter in diffusers' layout (a folder or its .safetensors file)."""
    file = adapter_file(path)
    state, metadata = read_file(file)
    if is_kohya(state) or any(k.startswith(PREFIX) for k in state):
        raise LorakitError(f"{file}: not diffusers' LoRA layout (<component>.<module>.lora_A.weight)")
    return state, alphas_from_metadata(state, metadata), file


def read_lora(path: str | Path, components: dict[str, nn.Module],
              denoiser: str) -> tuple[dict[str, Tensor], dict[str, float], Path]:
    """(diffusers-keyed state, alphas, the file read) of a diffusers, kohya or PEFT adapter."""
    from lorakit.lora.targets import base_modules

    file = adapter_file(path)
    state, metadata = read_file(file)
    if is_kohya(state):
        paths = {c: [p for p, _ in base_modules(m) if p] for c, m in components.items()}
        state, alphas = from_kohya(state, paths, str(file))
        return state, alphas, file
    if all(k.startswith(PREFIX) for k in state):  # PEFT's layout: one model, the denoiser
        config_file = file.parent / CONFIG_NAME
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LorakitError(f"{config_file}: needed beside {file.name} ({e})") from None
        state = {f"{denoiser}.{k.removeprefix(PREFIX)}": v for k, v in state.items()}
        pattern = config.get("alpha_pattern") or {}
        alphas = {}
        for module, r in ranks(state).items():
            path = module.split(".", 1)[1]
            alpha = next((a for p, a in pattern.items() if path == p or path.endswith("." + p)),
                         config.get("lora_alpha", r))
            alphas[module] = float(alpha) * (r**0.5 if config.get("use_rslora") else 1.0)  # scaling·r
        return state, alphas, file
    return state, alphas_from_metadata(state, metadata), file
