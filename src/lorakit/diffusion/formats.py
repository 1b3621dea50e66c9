"""Adapter files of text-to-image pipelines: one engine (lorakit's LoRA layers inside the pipeline's
components), formats at the edges as pure ``state_dict -> state_dict`` conversions.

The common form here is diffusers' keys plus one alpha per adapted module:

    state   {"unet.<module path>.lora_A.weight": (r, in), "unet.<module path>.lora_B.weight": (out, r),
             "text_encoder.<module path>.lora_A.weight": ..., "transformer.<path>...": ...}
    alphas  {"unet.<module path>": alpha}            update = (alpha / r)·B·A, as PEFT and kohya

Layouts on disk:

- diffusers: ``pytorch_lora_weights.safetensors`` with ``state`` as it is; the alphas go where diffusers
  ≥ 0.34 reads them, the safetensors header's ``lora_adapter_metadata`` (each component's PEFT LoraConfig
  under keys prefixed ``unet.`` / ``text_encoder.``), so ``pipe.load_lora_weights(folder)`` applies the
  trained scale. Without that metadata diffusers takes alpha = r, and so does ``from_diffusers``.
- kohya (A1111, ComfyUI, Forge): ``lora_unet_<path with _>.lora_down.weight`` (= A),
  ``.lora_up.weight`` (= B), ``.alpha`` (a scalar); text encoders ``lora_te_`` (SDXL: ``lora_te1_`` and
  ``lora_te2_``). Module paths are diffusers' (kohya's SD 1.x/2.x layout); diffusers' loader and ComfyUI
  also read this layout for SDXL.
- PEFT: ``base_model.model.<path>.lora_A.weight`` with ``adapter_config.json``, one component (the
  denoiser) per folder.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def split_key(key: str) -> tuple[str, str]:
    """``"unet.a.b.lora_A.weight"`` -> ``("unet.a.b", "lora_A")``."""
    m = _KEY.match(key)
    if m is None:
        raise LorakitError(f"unexpected key {key!r} (not <component>.<module>.lora_A/lora_B.weight)")
    return m["module"], m["part"]


def ranks(state: dict[str, Tensor]) -> dict[str, int]:
    """module -> rank r (the rows of its lora_A)."""
    return {split_key(k)[0]: t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight")}


# --- diffusers' metadata: each component's PEFT LoraConfig --------------------------------------------------


def peft_config(state: dict[str, Tensor], alphas: dict[str, float], component: str) -> dict:
    """PEFT's LoraConfig fields for ``component``'s modules: the most common rank and alpha, the others as
    rank_pattern/alpha_pattern, the exact module paths as target_modules (a full path matches only itself)."""
    r_of = {m.split(".", 1)[1]: r for m, r in ranks(state).items() if m.split(".", 1)[0] == component}
    if not r_of:
        raise LorakitError(f"no LoRA weights for {component}")
    a_of = {m.split(".", 1)[1]: float(a) for m, a in alphas.items() if m.split(".", 1)[0] == component}
    r = Counter(r_of.values()).most_common(1)[0][0]
    alpha = Counter(a_of.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(r_of),
            "rank_pattern": {p: v for p, v in sorted(r_of.items()) if v != r},
            "alpha_pattern": {p: v for p, v in sorted(a_of.items()) if v != alpha},
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True}


def to_diffusers_metadata(state: dict[str, Tensor], alphas: dict[str, float]) -> dict[str, str]:
    """The safetensors header diffusers' ``save_lora_weights`` writes: each component's config, its keys
    prefixed with the component (``unet.r``, ``unet.lora_alpha``, ...), as one JSON string."""
    packed = {}
    for component in sorted({k.split(".", 1)[0] for k in state}):
        packed.update({f"{component}.{k}": v for k, v in peft_config(state, alphas, component).items()})
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def alphas_from_metadata(state: dict[str, Tensor], metadata: dict[str, str] | None) -> dict[str, float]:
    """Each module's alpha from diffusers' header; alpha = r where it says nothing (diffusers' rule)."""
    packed = json.loads((metadata or {}).get(METADATA_KEY) or "{}")
    out = {}
    for module, r in ranks(state).items():
        component, path = module.split(".", 1)
        pattern = packed.get(f"{component}.alpha_pattern") or {}
        alpha = next((a for p, a in pattern.items() if path == p or path.endswith("." + p)),
                     packed.get(f"{component}.lora_alpha", r))
        out[module] = float(alpha)
    return out


# --- kohya ------------------------------------------------------------------------------------------------


def kohya_prefix(component: str, sdxl: bool) -> str:
    if component == "unet":
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te1" if sdxl else "lora_te"
    if component == "text_encoder_2":
        return "lora_te2"
    raise LorakitError(f"the kohya layout has no place for a {component} adapter: it covers UNet pipelines "
                       "(SD 1.x/2.x/SDXL) and their CLIP text encoders; keep SD3/Flux adapters in diffusers' "
                       "format (ComfyUI reads it)")


def to_kohya(state: dict[str, Tensor], alphas: dict[str, float], sdxl: bool = False) -> dict[str, Tensor]:
    """diffusers keys + alphas -> kohya's ``lora_unet_…`` keys with ``.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and a scalar ``.alpha`` per module."""
    out = {}
    for key, t in state.items():
        module, part = split_key(key)
        component, path = module.split(".", 1)
        name = f"{kohya_prefix(component, sdxl)}_{path.replace('.', '_')}"
        out[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(float(alphas[module]), dtype=torch.float32)
    return out


def from_kohya(state: dict[str, Tensor], module_paths: dict[str, Iterable[str]],
               source: str = "adapter") -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya keys -> (diffusers keys, alphas). ``_`` in kohya names is ambiguous (``to_q``,
    ``transformer_blocks``), so the pipeline's own module paths (component -> paths) resolve each name.
    A module without ``.alpha`` gets alpha = r (kohya's rule)."""
    sdxl = "text_encoder_2" in module_paths
    table = {}
    for component, paths in module_paths.items():
        try:
            prefix = kohya_prefix(component, sdxl)
        except LorakitError:
            continue
        table.update({f"{prefix}_{p.replace('.', '_')}": f"{component}.{p}" for p in paths})
    out: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for key, t in state.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise LorakitError(f"{source}: unexpected key {key!r} in a kohya LoRA (lora_unet_/lora_te_ "
                               "... .lora_down.weight, .lora_up.weight, .alpha)")
        module = table.get(m["name"])
        if module is None:
            raise LorakitError(f"{source}: {m['name']} names no module of this pipeline (was it trained on "
                               "another base model?)")
        if m["part"] == "alpha":
            alphas[module] = float(t.float().item())
        else:
            out[f"{module}.{'lora_A' if m['part'] == 'lora_down.weight' else 'lora_B'}.weight"] = t
    for module, r in ranks(out).items():
        alphas.setdefault(module, float(r))
    return out, alphas


def is_kohya(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in state)


# --- lorakit layers <-> the common form -----------------------------------------------------------------


def lora_tensors(components: dict[str, nn.Module], name: str = "default") -> tuple[dict[str, Tensor], dict[str, float]]:
    """Adapter ``name`` of each component as (diffusers-keyed state, alphas). A module's alpha is its
    scaling·r, so alpha/r reproduces the trained scaling (rsLoRA's α/√r included)."""
    from lorakit.lora import lora_layers

    state, alphas = {}, {}
    for component, module in components.items():
        for path, layer in lora_layers(module):
            if name in layer.adapters:
                ad = layer.adapters[name]
                state[f"{component}.{path}.lora_A.weight"] = ad.lora_A.detach().contiguous().cpu()
                state[f"{component}.{path}.lora_B.weight"] = ad.lora_B.detach().contiguous().cpu()
                alphas[f"{component}.{path}"] = ad.scaling * ad.r
    if not state:
        raise LorakitError(f"no adapter named {name!r} in {', '.join(components)}")
    return state, alphas


def apply_lora(components: dict[str, nn.Module], state: dict[str, Tensor], alphas: dict[str, float],
               source: str, name: str = "default") -> list[str]:
    """Add adapter ``name`` to each component ``state`` has weights for (shapes checked, modules named
    in errors); returns those components."""
    from lorakit.lora import lora_layers
    from lorakit.lora.io import PREFIX, apply_adapter

    by_component: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        component = key.split(".", 1)[0]
        if component not in components:
            raise LorakitError(f"{source}: {key}: this pipeline has no {component} (it has "
                               f"{', '.join(components)})")
        by_component.setdefault(component, {})[PREFIX + key.split(".", 1)[1]] = t
    for component, tensors in by_component.items():
        model = components[component]
        config = peft_config(state, alphas, component)  # per-module scaling is set exactly below
        apply_adapter(model, config, tensors, Path(source), name)
        for path, layer in lora_layers(model):
            if name in layer.adapters:
                ad = layer.adapters[name]
                ad.scaling = alphas[f"{component}.{path}"] / ad.r
    return list(by_component)
