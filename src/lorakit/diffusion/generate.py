"""`lorakit generate-image`: images from a pipeline plus LoRA adapters at a chosen strength.

The adapters run in lorakit's LoRA layers inside the pipeline's own components, and the image comes from
the pipeline's own ``__call__``: at the same seed, steps, size, guidance and scale it is the image diffusers
makes after ``pipe.load_lora_weights(folder)`` with ``cross_attention_kwargs={"scale": s}`` (the tests hold it
to 1/255 per pixel). Scale 0 runs the base weights alone, so it is the base pipeline's image exactly.

Several adapters combine like diffusers' ``set_adapters(names, adapter_weights)``: adapter i runs at
``weight_i · scale``. Several scales or seeds give a grid: one column per scale, one row per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.diffusion.formats import apply_lora
from lorakit.diffusion.io import adapter_file, read_lora
from lorakit.diffusion.pipeline import denoiser_name, load_pipeline, lora_components
from lorakit.errors import LorakitError
from lorakit.fileio import write_atomic
from lorakit.lora import set_adapter_scale


def base_of(adapter: str) -> str | None:
    """The pipeline an adapter folder was trained on (its adapter_config.json), if it says."""
    config = adapter_file(adapter).parent / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_adapters(pipe: Any, adapters: list[str]) -> list[str]:
    """Add each adapter (a folder or a .safetensors file: diffusers', kohya's or PEFT's layout) to ``pipe``
    as adapter ``a0``, ``a1``, ...; returns the names."""
    components = lora_components(pipe)
    names = []
    for i, path in enumerate(adapters):
        state, alphas, file = read_lora(path, components, denoiser_name(pipe))
        apply_lora(components, state, alphas, str(file), f"a{i}")
        names.append(f"a{i}")
    return names


def set_scale(pipe: Any, names: list[str], weights: list[float], scale: float) -> None:
    """Adapter i runs at ``weights[i] · scale`` in every component that holds it."""
    from lorakit.lora import adapter_names

    for module in lora_components(pipe).values():
        present = adapter_names(module)
        for name, w in zip(names, weights, strict=True):
            if name in present:
                set_adapter_scale(module, w * scale, name)


@torch.no_grad()
def generate(pipe: Any, prompt: str | list[str], seed: int, steps: int | None = None, guidance: float | None = None,
             height: int | None = None, width: int | None = None, negative_prompt: str | None = None) -> list:
    """The pipeline's images for ``prompt`` with the adapters as they are set, from
    ``torch.Generator().manual_seed(seed)`` (on the CPU, so a seed means the same image on any device)."""
    kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)}
    for key, value in (("num_inference_steps", steps), ("guidance_scale", guidance), ("height", height),
                       ("width", width), ("negative_prompt", negative_prompt)):
        if value is not None:
            kwargs[key] = value
    return pipe(prompt, **kwargs).images


def label_grid(images: list[list[Any]], columns: list[str], rows: list[str], title: str = "",
               zoom: int = 1) -> Any:
    """``images[row][column]`` in one picture, each column labelled on top and each row on the left."""
    from PIL import Image, ImageDraw

    w, h = images[0][0].size
    w, h = w * zoom, h * zoom
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + int(max(measure.textlength(name) for name in rows))
    top, pad = 20 + (14 if title else 0), 4
    width = max(left + len(columns) * (w + pad), 8 + int(measure.textlength(title)))
    grid = Image.new("RGB", (width, top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for j, name in enumerate(columns):
        draw.text((left + j * (w + pad) + 2, top - 14), name, fill="black")
    for i, name in enumerate(rows):
        draw.text((4, top + i * (h + pad) + h // 2 - 6), name, fill="black")
        for j, im in enumerate(images[i]):
            grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (left + j * (w + pad), top + i * (h + pad)))
    return grid


def generate_image_command(model: str | None, adapters: list[str], weights: list[float] | None, prompt: str,
                           scales: list[float] | None, seeds: list[int], steps: int | None, guidance: float | None,
                           height: int | None, width: int | None, negative_prompt: str | None, out: str) -> int:
    """CLI entry: one image, or a grid of scales (columns) × seeds (rows), written to ``out``."""
    if scales is not None and not adapters:
        raise LorakitError("--scale/--scales set the adapters' strength; give --adapter DIR")
    scales = scales or [1.0]
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LorakitError(f"--adapter-weights: {len(weights)} weights for {len(adapters)} adapters")
    model = model or (base_of(adapters[0]) if adapters else None)
    if model is None:
        raise LorakitError("--model is required (the adapter's adapter_config.json names no base pipeline)")
    dest = Path(out)
    if dest.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise LorakitError(f"--out {out}: give an image file name (.png)")
    if not dest.parent.is_dir():
        raise LorakitError(f"--out {out}: folder {dest.parent} does not exist")
    pipe = load_pipeline(model, torch.float32)
    names = load_adapters(pipe, adapters)
    rows = []
    for seed in seeds:
        row = []
        for scale in scales:
            set_scale(pipe, names, weights, scale)
            row.extend(generate(pipe, prompt, seed, steps, guidance, height, width, negative_prompt))
        rows.append(row)
    if len(scales) == 1 and len(seeds) == 1:
        picture = rows[0][0]
    else:
        zoom = max(1, 256 // rows[0][0].size[0])
        picture = label_grid(rows, [f"scale {s:g}" for s in scales], [f"seed {s}" for s in seeds], prompt, zoom)
    write_atomic(dest, lambda p: picture.save(p, format=dest.suffix.lstrip(".").upper().replace("JPG", "JPEG")))
    print(f"wrote {dest} ({len(scales)} scale{'s' * (len(scales) > 1)} × {len(seeds)} seed{'s' * (len(seeds) > 1)})",
          file=sys.stderr)
    return 0
