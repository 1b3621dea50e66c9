"""What every export format reads: the base model (fp32, in PyTorch) with each adapter loaded under its name,
its tokenizer and config, and the adapters as (module, A, B, scaling) — the numbers a format writes.

The adapters are loaded with ``lorakit.load_adapter``, so scaling already holds what PEFT's config says
(alpha/r, rsLoRA's alpha/sqrt(r), ``alpha_pattern``) and shapes are checked against the base. The same
model is the parity check's reference: PyTorch, fp32, the adapter on (or off, or at a scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.export import AdapterSource, ExportJob


@dataclass
class LoraWeight:
    """One adapted module: ΔW = scaling · B·A with A (r, in), B (out, r); for an embedding PEFT's layout,
    A (r, num_embeddings), B (dim, r), ΔE = scaling · (B·A)ᵀ."""

    path: str          # the module's path in the HF model, e.g. model.layers.0.self_attn.q_proj
    a: Tensor
    b: Tensor
    scaling: float
    embedding: bool = False

    @property
    def r(self) -> int:
        return self.a.shape[0]


@dataclass
class Source:
    base: str                    # the base as the user knows it: a model folder, or a GGUF file
    folder: str                  # a Hugging Face folder holding it (a GGUF base: lorakit's conversion of it)
    gguf_file: Path | None       # the GGUF file the adapters were trained on, when they were
    config: Any                  # transformers PretrainedConfig
    tokenizer: Any
    model: nn.Module             # fp32, eval, every adapter loaded (under ``key(name)``), none active
    adapters: list[AdapterSource]

    def key(self, name: str) -> str:
        """The name adapter ``name`` is loaded under: its position, since a folder's name ("half", "float")
        may clash with an nn.Module attribute."""
        return f"adapter{[a.name for a in self.adapters].index(name)}"

    def lora_weights(self, name: str) -> list[LoraWeight]:
        from lorakit.lora import lora_layers
        from lorakit.lora.layer import LoraEmbedding

        out, key = [], self.key(name)
        for path, layer in lora_layers(self.model):
            if key in layer.adapters:
                ad = layer.adapters[key]
                out.append(LoraWeight(path, ad.lora_A.detach().float(), ad.lora_B.detach().float(), float(ad.scaling),
                                      isinstance(layer, LoraEmbedding)))
        return out

    def base_state_dict(self) -> dict[str, Tensor]:
        """The base's own tensors (fp32) under their HF names; adapters left out."""
        return {k: v.detach().float() for k, v in self.model.state_dict().items() if ".adapters." not in k}

    def merged_state_dict(self, name: str) -> dict[str, Tensor]:
        """The base's tensors with adapter ``name`` folded in, W + s·B·A, checked for NaN/inf as lorakit merge."""
        from lorakit.lora import lora_layers

        state, key = self.base_state_dict(), self.key(name)
        for path, layer in lora_layers(self.model):
            if key in layer.adapters:
                merged = state[f"{path}.weight"] + layer.delta_weight(key).float()
                if not torch.isfinite(merged).all():
                    raise LorakitError(f"merging adapter {name!r} into {path} gives NaN/inf weights; the adapter is "
                                       "broken (check its training loss)")
                state[f"{path}.weight"] = merged
        return state

    def use(self, name: str | None, scale: float = 1.0) -> nn.Module:
        """The reference model with adapter ``name`` alone at ``scale`` (None: the base alone)."""
        from lorakit.lora import set_adapter

        set_adapter(self.model, [self.key(name)] if name else [], None if name is None else [scale])
        return self.model


def base_name(job: ExportJob) -> str:
    """``--model``, else the base every adapter was trained on (they must agree)."""
    from lorakit.model import model_config_for

    if job.model:
        return job.model
    names = {a.name: model_config_for(None, str(a.path)).name_or_path for a in job.adapters}
    if len(set(names.values())) > 1:
        listed = "; ".join(f"{k}: {v}" for k, v in names.items())
        raise LorakitError(f"the adapters were trained on different bases ({listed}); export them separately or "
                           "pass --model")
    return next(iter(names.values()))


def gguf_base(job: ExportJob) -> Path | None:
    """The GGUF file the export pairs the adapters with, or None for a Hugging Face base: ``--model FILE.gguf``,
    else the file the adapters were trained on (their ``lorakit_base.json``), checked to be that very file
    (size and SHA-256)."""
    from lorakit.gguf import file_sha256, find_gguf
    from lorakit.model import recorded_base

    if job.model:
        return find_gguf(job.model)
    records = [recorded_base(a.path) for a in job.adapters]
    found = [r for r in records if r and r.get("format") == "gguf"]
    if not found:
        return None
    if len(found) != len(records) or len({r["sha256"] for r in found}) > 1:
        raise LorakitError("the adapters were trained on different bases; export them separately")
    record, where = found[0], job.adapters[records.index(found[0])].path / "lorakit_base.json"
    path = Path(record["path"])
    if not path.is_file():
        raise LorakitError(f"{where}: the base {path} is gone; pass --model with the GGUF file "
                           f"{record['file_name']} (SHA-256 {record['sha256'][:12]}...)")
    if path.stat().st_size != record["size"] or file_sha256(path) != record["sha256"]:
        raise LorakitError(f"{path}: not the file the adapter was trained on (its size or SHA-256 differ from "
                           f"{where}); restore that file, or pass --model to pair the adapter with another")
    return path


def adapted_modules(job: ExportJob) -> dict[str, list[str]]:
    """{adapter name: the module paths its weights adapt}, read from the files (nothing loaded)."""
    from lorakit.lora.io import PREFIX, read_adapter

    out = {}
    for a in job.adapters:
        keys = read_adapter(a.path)[1]
        out[a.name] = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k})
    return out


def load_source(job: ExportJob, check: Callable[[Any, str, dict[str, list[str]]], object] | None = None) -> Source:
    """The base (fp32, on the CPU) with every adapter of ``job`` loaded and switched off, and its tokenizer.
    ``check(config, base, adapted_modules(job))`` sees a model folder's config.json first, to refuse what the
    format cannot express in one line before anything is loaded."""
    from lorakit.config import ModelConfig
    from lorakit.lora import load_adapter
    from lorakit.model import load_model, load_tokenizer, resolve_model_path

    gguf_file = gguf_base(job)
    name = str(gguf_file) if gguf_file else base_name(job)
    if check is not None and Path(name, "config.json").is_file():
        from transformers import AutoConfig

        check(AutoConfig.from_pretrained(name), name, adapted_modules(job))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # export prints its own report of what it loaded and wrote
    cfg = ModelConfig(name_or_path=name, dtype="float32")
    tokenizer = load_tokenizer(resolve_model_path(name))
    model = load_model(cfg, device=torch.device("cpu"))
    folder = _hf_folder(name, gguf_file)
    for i, a in enumerate(job.adapters):
        load_adapter(model, a.path, f"adapter{i}")
    source = Source(base=name, folder=folder, gguf_file=gguf_file, config=model.config, tokenizer=tokenizer,
                    model=model.eval(), adapters=job.adapters)
    source.use(None)
    return source


def _hf_folder(name: str, gguf_file: Path | None) -> str:
    """A local Hugging Face folder for the base: the model folder itself, or lorakit's conversion of a GGUF file."""
    if gguf_file is not None:
        from lorakit.gguf import converted_folder

        return str(converted_folder(gguf_file))
    if Path(name).is_dir():
        return str(Path(name).resolve())
    raise LorakitError(f"--model {name}: export needs a local model folder or GGUF file, not a hub id "
                       "(download it first)")
