"""PEFT's on-disk adapter format, read and written exactly, so adapters move unchanged between lorakit,
PEFT, vLLM, TGI and LoRAX.

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight        (r, in)
                                 base_model.model.<module path>.lora_B.weight        (out, r)
                                 base_model.model.<module path>.lora_embedding_A     (r, num_embeddings)
                                 base_model.model.<module path>.lora_embedding_B     (dim, r)

An adapter file is untrusted input: only JSON and safetensors are read, never a pickle.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic
from lorakit.gguf import BASE_RECORD, find_gguf, write_base_record
from lorakit.lora.inject import inject, lora_layers
from lorakit.lora.layer import LoraEmbedding, wrap
from lorakit.lora.targets import base_modules, supported

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS"}


def _suffixes(is_embedding: bool) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A.weight", "lora_B.weight")


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter ``name``'s tensors under PEFT's key names (as stored: no PiSSA conversion)."""
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            ad = layer.adapters[name]
            sa, sb = _suffixes(isinstance(layer, LoraEmbedding))
            out[f"{PREFIX}{path}.{sa}"] = ad.lora_A.detach()
            out[f"{PREFIX}{path}.{sb}"] = ad.lora_B.detach()
    if not out:
        raise LorakitError(f"the model has no adapter named {name!r}")
    return out


def _pissa_to_lora(model: nn.Module, name: str) -> dict[str, Tensor]:
    """A PiSSA adapter trained on the residual W - s·B₀A₀ becomes a rank-2r LoRA for the original W:
    s·[B | -B₀]·[A ; A₀] = s·B·A - s·B₀·A₀ (PEFT's conversion; alpha doubles so s is unchanged)."""
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.adapters:
            ad = layer.adapters[name]
            sa, sb = _suffixes(False)
            out[f"{PREFIX}{path}.{sa}"] = torch.cat([ad.lora_A.detach(), ad.init_A], 0)  # (2r, in)
            out[f"{PREFIX}{path}.{sb}"] = torch.cat([ad.lora_B.detach(), -ad.init_B], 1)  # (out, 2r)
    return out


def _leaf(path: str) -> str:
    """A module's name as PEFT's target_modules matches it: the last component, with its parent when
    it is an index (``to_out.0``: a bare ``0`` would match every first child)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _target_modules(model: nn.Module, paths: list[str], cfg: LoraConfig) -> list[str] | str:
    """PEFT's target_modules for exactly these paths: the leaf names when they select nothing more,
    else a regex over the full paths."""
    leaves = sorted({_leaf(p) for p in paths})
    selected = [p for p, m in base_modules(model) if p and supported(m) and _leaf(p) in leaves]
    if selected == paths:
        return leaves
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def adapter_config(model: nn.Module, name: str, base_model_name_or_path: str | None = None) -> dict:
    cfg: LoraConfig = getattr(model, "lora_configs", {}).get(name) or LoraConfig()
    paths = [p for p, layer in lora_layers(model) if name in layer.adapters]
    r, alpha = cfg.r, cfg.alpha
    if cfg.init == "pissa":
        r, alpha = 2 * r, alpha * (2**0.5 if cfg.rslora else 2)
    cls = type(model).__name__
    task = next((t for suffix, t in _TASK_TYPES.items() if cls.endswith(suffix)), None)
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": task, "auto_mapping": None,
        "base_model_name_or_path": base, "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(model, paths, cfg), "exclude_modules": None,
        "use_rslora": cfg.rslora, "use_dora": False, "fan_in_fan_out": any(
            getattr(layer, "fan_in_fan_out", False) for _, layer in lora_layers(model)),
        "bias": "none", "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter ``name`` as PEFT does, atomically (files appear complete or not at all).
    A PiSSA adapter is converted so that it applies to the untouched original base. A GGUF file as the
    base is also recorded with its SHA-256 in ``lorakit_base.json`` (``lorakit.gguf.recorded_base``)."""
    cfg = getattr(model, "lora_configs", {}).get(name)
    state = _pissa_to_lora(model, name) if cfg is not None and cfg.init == "pissa" else lora_state_dict(model, name)
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    config = adapter_config(model, name, base_model_name_or_path)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    base = config["base_model_name_or_path"]
    if base and Path(base).is_file() and find_gguf(base):
        write_base_record(out, base)
    else:
        (out / BASE_RECORD).unlink(missing_ok=True)  # a stale record of an earlier adapter in this folder
    write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config, tensors) from a PEFT adapter folder, with one-line errors for bad files."""
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise LorakitError(f"{folder}: adapter folder not found")
    if not cfg_file.is_file():
        raise LorakitError(f"{cfg_file}: missing (a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(f"{cfg_file}: unreadable adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LorakitError(f"{cfg_file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, "
                           "lorakit reads LoRA adapters (peft_type LORA)")
    if config.get("use_dora"):
        raise LorakitError(f"{cfg_file}: DoRA adapters (use_dora: true) are not supported")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise LorakitError(f"{folder}/adapter_model.bin: pickled adapters are not loaded (untrusted code); "
                               "convert it to adapter_model.safetensors with PEFT first")
        raise LorakitError(f"{weights}: missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorakitError(f"{weights}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add the PEFT adapter at ``path`` to ``model`` as ``name`` (in place). Shapes are checked against the
    base: the first mismatching key is named with both shapes."""
    config, tensors = read_adapter(path)
    return apply_adapter(model, config, tensors, Path(path) / WEIGHTS_NAME, name, trainable)


def apply_adapter(model: nn.Module, config: dict, tensors: dict[str, Tensor], weights_file: Path,
                  name: str = "default", trainable: bool = False) -> nn.Module:
    """Add an adapter given as PEFT's config dict and PEFT-keyed tensors (``load_adapter`` without the
    files: converters of other layouts, such as diffusers' and kohya's, end here). ``weights_file``
    names the source in errors."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' base weights too: the base has them
            continue
        m = _KEY.match(key.removeprefix(PREFIX))
        if not key.startswith(PREFIX) or m is None:
            raise LorakitError(f"{weights_file}: unexpected key {key!r} (not a LoRA weight in PEFT's layout)")
        grouped.setdefault(m["path"], {})[m["part"].split(".")[0][-1]] = t  # "A" or "B"
    if not grouped:
        raise LorakitError(f"{weights_file}: holds no LoRA weights")
    modules = dict(base_modules(model))
    ranks = {}
    for mod_path, parts in grouped.items():
        _check_shapes(weights_file, mod_path, parts, modules.get(mod_path))
        ranks[mod_path] = parts["A"].shape[0]
    alpha_pattern = config.get("alpha_pattern") or {}
    lcfg = LoraConfig(r=int(config.get("r") or 8), alpha=float(config.get("lora_alpha") or 8),
                      dropout=float(config.get("lora_dropout") or 0.0),
                      target_modules=sorted(grouped), rslora=bool(config.get("use_rslora")))
    inject(model, sorted(grouped), name, lcfg, ranks)
    for mod_path, layer in lora_layers(model):
        if mod_path in grouped:
            ad = layer.adapters[name]
            alpha = next((a for pat, a in alpha_pattern.items() if re.search(pat, mod_path)), lcfg.alpha)
            ad.scaling = alpha / (ad.r**0.5 if lcfg.rslora else ad.r)
            with torch.no_grad():
                ad.lora_A.copy_(grouped[mod_path]["A"])
                ad.lora_B.copy_(grouped[mod_path]["B"])
            ad.lora_A.requires_grad_(trainable)
            ad.lora_B.requires_grad_(trainable)
    return model


def _check_shapes(file: Path, mod_path: str, parts: dict[str, Tensor], module: nn.Module | None) -> None:
    if module is None or not supported(module):
        raise LorakitError(f"{file}: {PREFIX}{mod_path} names a module this base model does not have "
                           "(was the adapter trained on another model?)")
    if set(parts) != {"A", "B"}:
        raise LorakitError(f"{file}: {PREFIX}{mod_path} has only lora_{''.join(parts)}; both A and B are needed")
    is_emb = isinstance(module, nn.Embedding)
    sa, sb = _suffixes(is_emb)
    r = parts["A"].shape[0]
    want_a, want_b = wrap(module).adapter_shapes(r)
    for part, suffix, want in (("A", sa, want_a), ("B", sb, want_b)):
        got = tuple(parts[part].shape)
        if got != tuple(want):
            raise LorakitError(f"{file}: {PREFIX}{mod_path}.{suffix} has shape {got}, but this base needs "
                               f"{tuple(want)}; the adapter does not fit this model")
