"""Put LoRA layers into a model, choose which adapters run, and count what trains."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora.layer import LoraLayer, init_adapter, wrap
from lorakit.lora.targets import select_targets


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield path, m


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.adapters if n not in names]
    return names


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject(model: nn.Module, paths: Sequence[str], name: str, config: LoraConfig,
           ranks: dict[str, int] | None = None) -> None:
    """Add adapter ``name`` at each path (wrapping the module the first time), then freeze the base."""
    if name in adapter_names(model):
        raise LorakitError(f"the model already has an adapter named {name!r}; pick another name")
    for path in paths:
        m = model.get_submodule(path)
        layer = m if isinstance(m, LoraLayer) else wrap(m)
        r = (ranks or {}).get(path, config.r)
        scaling = config.alpha / (r**0.5 if config.rslora else r)
        layer.add_adapter(name, r, scaling, config.dropout)
        init_adapter(layer, name, config.init)
        if layer is not m:
            _set_submodule(model, path, layer)
    for pname, p in model.named_parameters():
        p.requires_grad_(".adapters." in pname)
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: config}


def add_lora(model: nn.Module, config: LoraConfig | None = None, name: str = "default") -> nn.Module:
    """Add a LoRA adapter in place (PEFT's target rules; see ``LoraConfig``) and freeze the base.

    A second call with another ``name`` adds a second adapter beside the first; both run, summed,
    until ``set_adapter`` chooses.
    """
    config = config or LoraConfig()
    inject(model, select_targets(model, config.target_modules, config.exclude_modules), name, config)
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
    """Choose the adapters that run: one name, several (summed, each times its weight), or [] for none."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise LorakitError(f"no adapter named {n!r}; the model has {', '.join(known) or 'none'}")
    if weights is not None and len(weights) != len(names):
        raise LorakitError(f"{len(weights)} weights for {len(names)} adapters")
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.adapters]
    if weights is not None:
        for n, w in zip(names, weights, strict=True):
            set_adapter_scale(model, w, n)


def set_adapter_scale(model: nn.Module, scale: float, name: str = "default") -> None:
    """The strength knob: 1 as trained, 0.5 half, 0 off. Merged adapters must be unmerged first."""
    found = False
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            if name in layer.merged_adapters:
                raise LorakitError(f"adapter {name!r} is merged; unmerge it before changing its scale")
            layer.adapters[name].scale = float(scale)
            found = True
    if not found:
        raise LorakitError(f"no adapter named {name!r}")


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (a free reference model); merged adapters stay merged."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, d in zip(layers, before, strict=True):
            layer.disabled = d


def lora_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    for _, layer in lora_layers(model):
        for n, ad in layer.adapters.items():
            if name is None or n == name:
                yield ad.lora_A
                yield ad.lora_B


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once. Total includes the adapters."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes packs two 4-bit weights per uint8 element: count the weights, not the storage
        if getattr(p, "quant_state", None) is not None:
            n = int(p.quant_state.shape.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
