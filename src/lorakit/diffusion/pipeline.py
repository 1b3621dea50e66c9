"""Diffusers pipelines as lorakit sees them: which folder is one, what its denoiser is, how to load it.

A pipeline folder holds ``model_index.json`` and one subfolder per component (``unet`` or ``transformer``,
``vae``, ``text_encoder``…, ``tokenizer``…, ``scheduler``). Its family decides the conditioning and the
objective:

    sd      UNet2DConditionModel (SD 1.x / 2.x): one CLIP text encoder, epsilon or v-prediction
    sdxl    UNet2DConditionModel with added "text_time" conditioning: two text encoders, pooled text
            embedding and size/crop ids
    sd3     SD3Transformer2DModel: CLIP-L, CLIP-G (+ T5), flow matching
    flux    FluxTransformer2DModel: CLIP-L + T5, flow matching, packed 2×2 latent patches
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

FAMILIES = ("sd", "sdxl", "sd3", "flux")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# LoRA targets of a CLIP text encoder (diffusers' --train_text_encoder)
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / "model_index.json").is_file()


def resolve_pipeline_path(name_or_path: str) -> str:
    """A pipeline folder -> its absolute path (config.yaml then works from any directory)."""
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        raise LorakitError(f"--model {name_or_path}: no such folder; give a diffusers pipeline folder (one "
                           "with model_index.json, as pipe.save_pretrained writes)")
    if not is_pipeline_folder(p):
        raise LorakitError(f"--model {name_or_path}: no model_index.json in this folder; text-to-image needs a "
                           "diffusers pipeline folder")
    return str(p.resolve())


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Any:
    """The ``DiffusionPipeline`` in ``name_or_path`` on ``device`` (CUDA when there is one), progress bars off."""
    # diffusers imports bitsandbytes; imported by lorakit first it is quiet (no warning that the optional
    # `kernels` package is missing) and light (no torch.compile stack)
    importlib.import_module("lorakit.quant.bnb")
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from packaging.version import Version
    from transformers.utils import logging as transformers_logging

    from lorakit.model import default_device

    path = resolve_pipeline_path(name_or_path)
    # diffusers logs every default it fills in while loading, and both libraries draw a progress bar per
    # component and per weight file: the user asked for none of it
    level = logging.getLogger("diffusers").level
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in bars:
        lib.disable_progress_bar()
    # transformers warns, as each pipeline class is imported, that torchvision is missing and it uses PIL
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        # diffusers 0.42 renamed torch_dtype to dtype (the old name still works, with a warning)
        key = "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"
        pipe = DiffusionPipeline.from_pretrained(path, **{key: dtype})
    except Exception as e:  # diffusers raises ValueError/OSError/EnvironmentError/KeyError by the component
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LorakitError(f"--model {name_or_path}: could not load the pipeline ({first})") from None
    finally:
        logging.getLogger("diffusers").setLevel(level)
        transformers_logging.set_verbosity(verbosity)
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()
    family(pipe)  # refuse unknown denoisers here, before any work
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def denoiser_name(pipe: Any) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def family(pipe: Any) -> str:
    """sd, sdxl, sd3 or flux, from the denoiser's class (see the module docstring)."""
    den = getattr(pipe, denoiser_name(pipe), None)
    name = type(den).__name__
    if name == "UNet2DConditionModel":
        return "sdxl" if den.config.get("addition_embed_type") == "text_time" else "sd"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise LorakitError(f"{type(pipe).__name__} with a {name} denoiser is not supported; lorakit trains "
                       "UNet2DConditionModel (SD 1.x/2.x/SDXL), SD3Transformer2DModel and FluxTransformer2DModel")


def text_encoders(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (text_encoder, text_encoder_2, ...), present ones only."""
    return {n: getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None}


def lora_components(pipe: Any) -> dict[str, nn.Module]:
    """Every component an adapter file may hold weights for, by the key prefix diffusers uses."""
    return {denoiser_name(pipe): getattr(pipe, denoiser_name(pipe)), **text_encoders(pipe)}


def native_resolution(pipe: Any) -> int:
    """The image size the pipeline generates by default (pixels)."""
    den = getattr(pipe, denoiser_name(pipe))
    sample = getattr(pipe, "default_sample_size", None) or den.config.get("sample_size") or 64
    return int(sample * pipe.vae_scale_factor)
