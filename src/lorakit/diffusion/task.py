"""The text-to-image task: LoRA on a diffusers pipeline's denoiser (and optionally its text encoders),
trained by the one loop in ``train/loop.py`` (see ``train/task.py`` for the protocol).

One example is one (image, caption) pair; the loss unit is one image (the loop averages over images).
What is frozen is encoded once: with the VAE frozen and a deterministic crop, each image's VAE posterior
(mean, log-variance) is cached and a latent is sampled from it every step (what diffusers' scripts draw from
``latent_dist`` each step); with the text encoders frozen, each caption's embeddings are cached. Everything
random in a step (crop, flip, latent sample, noise, timestep) comes from torch's global generator, which
checkpoints restore: a resumed run computes the same adapter.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig, RunConfig
from lorakit.device import use_bf16
from lorakit.diffusion.data import ImageRecord, load_image, prepare, read_records
from lorakit.diffusion.io import save_lora
from lorakit.diffusion.objective import Objective, sdxl_time_ids
from lorakit.diffusion.pipeline import (
    TEXT_ENCODER_TARGETS,
    denoiser_name,
    family,
    load_pipeline,
    native_resolution,
    resolve_pipeline_path,
    text_encoders,
)
from lorakit.errors import LorakitError
from lorakit.lora import add_lora
from lorakit.model import default_device, resolve_dtype

ENCODE_BATCH = 16  # images per VAE call and captions per text-encoder call while caching


class TextToImageTask:
    """See the module docstring; ``model`` is a ModuleDict of the trained components by pipeline name
    (``unet`` or ``transformer``, plus ``text_encoder``… with --train-text-encoder), so checkpoint keys
    and the adapter file's keys are diffusers' own."""

    unit = "img"

    def __init__(self, cfg: RunConfig):
        d, t = cfg.diffusion, cfg.train
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name_or_path=resolve_pipeline_path(cfg.model.name_or_path), task="text-to-image"))
        if t.method != "lora":
            raise LorakitError("--method full is for language models; text-to-image trains LoRA (--method lora)")
        if cfg.model.quantization != "none":
            raise LorakitError("--quantization applies to language models; text-to-image trains on a 16/32-bit "
                               "pipeline (--quantization none)")
        if not cfg.data.train:
            raise LorakitError("--data is required: a JSON/JSONL file of {\"image\", \"text\"} records or a folder "
                               "of images with same-named .txt captions")
        # every record and every image checked (file:line) before the weights are loaded
        self.train_set, self.val_set = self._records(cfg)
        for r in self.train_set + self.val_set:
            load_image(r)

        device = default_device()
        self.pipe = pipe = load_pipeline(cfg.model.name_or_path, resolve_dtype(cfg.model), device)
        self.family = family(pipe)
        self.resolution = d.resolution or native_resolution(pipe)
        factor = pipe.vae_scale_factor * (2 if self.family == "flux" else 1)
        if self.resolution % factor:
            raise LorakitError(f"--resolution {self.resolution} must be a multiple of {factor} for this pipeline")
        if d.train_text_encoder and self.family not in ("sd", "sdxl"):
            raise LorakitError("--train-text-encoder covers the CLIP text encoders of UNet pipelines (SD 1.x/2.x/"
                               "SDXL); SD3/Flux train the transformer only")
        self.objective = Objective(pipe, self.family, d)
        self.bf16 = use_bf16(t.precision, device)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()

        self.denoiser = denoiser_name(pipe)
        trained: dict[str, nn.Module] = {self.denoiser: getattr(pipe, self.denoiser)}
        if d.train_text_encoder:
            trained.update(text_encoders(pipe))
        # caches are built with the base weights alone, before any LoRA exists
        self.flip = d.random_flip
        self.cache_latents = d.cache_latents and d.crop == "center"
        if d.cache_latents and d.crop == "random":
            print("--crop random: latents are encoded every step (a cache would fix one crop)", file=sys.stderr)
        self.posteriors = self._encode_images(self.train_set) if self.cache_latents else None
        self.val_posteriors = self._encode_images(self.val_set) if self.val_set else None
        self.embeds = None if d.train_text_encoder else self._encode_captions(self.train_set + self.val_set)

        add_lora(trained[self.denoiser], cfg.lora)
        if d.train_text_encoder:
            te_cfg = dataclasses.replace(cfg.lora, target_modules=TEXT_ENCODER_TARGETS, exclude_modules=[])
            for name in text_encoders(pipe):
                add_lora(trained[name], LoraConfig(**{f.name: getattr(te_cfg, f.name)
                                                       for f in dataclasses.fields(LoraConfig)}))
        if cfg.model.gradient_checkpointing:
            trained[self.denoiser].enable_gradient_checkpointing()
        self.model = nn.ModuleDict(trained).train()

    # --- data ------------------------------------------------------------------------------------------------

    @staticmethod
    def _records(cfg: RunConfig) -> tuple[list[ImageRecord], list[ImageRecord]]:
        d = cfg.data
        train = read_records(d.train, cfg.diffusion.trigger_word)
        if d.val:
            return train, read_records(d.val, cfg.diffusion.trigger_word)
        if d.val_fraction > 0:
            order = list(range(len(train)))
            random.Random(cfg.train.seed).shuffle(order)
            n_val = max(1, round(d.val_fraction * len(order)))
            if n_val >= len(order):
                raise LorakitError(f"--val-fraction {d.val_fraction} leaves no training data of {len(order)} images")
            held = set(order[:n_val])
            return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
        return train, []

    def _pixels(self, record: ImageRecord, flip: bool = False, crop: str | None = None):
        return prepare(load_image(record), self.resolution, crop or self.cfg.diffusion.crop, flip)

    @torch.no_grad()
    def _encode_images(self, records: list[ImageRecord]) -> dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]:
        """(record index, flipped) -> (VAE posterior (2C, h, w), SDXL time ids (6,)), centre-cropped; both
        orientations with --random-flip."""
        out = {}
        keys = [(i, f) for i in range(len(records)) for f in ((False, True) if self.flip else (False,))]
        for s in range(0, len(keys), ENCODE_BATCH):
            chunk = keys[s:s + ENCODE_BATCH]
            prepared = [self._pixels(records[i], f, "center") for i, f in chunk]
            post = self.objective.posterior(torch.stack([p.pixels for p in prepared]))
            for (i, f), p, q in zip(chunk, prepared, post, strict=True):
                out[(i, f)] = (q, sdxl_time_ids(p.original_size, p.crop_top_left, self.resolution))
        return out

    @torch.no_grad()
    def _encode_captions(self, records: list[ImageRecord]) -> dict[str, dict[str, torch.Tensor]]:
        captions = sorted({r.caption for r in records})
        out = {}
        for s in range(0, len(captions), ENCODE_BATCH):
            chunk = captions[s:s + ENCODE_BATCH]
            cond = self.objective.encode_captions(chunk)
            for j, c in enumerate(chunk):
                out[c] = {k: v[j].cpu() for k, v in cond.items()}
        return out

    # --- the Task protocol -----------------------------------------------------------------------------------

    def batch_order(self, epoch: int, batch_size: int) -> list[list[int]]:
        """A seeded shuffle per epoch, cut into micro-batches (all images have one size: no grouping)."""
        order = list(range(len(self.train_set)))
        random.Random(f"{self.cfg.train.seed}:{epoch}").shuffle(order)
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]

    def collate(self, indices: list[int]) -> dict[str, Any]:
        flips = [bool(torch.rand(()) < 0.5) if self.flip else False for _ in indices]
        batch: dict[str, Any] = {"captions": [self.train_set[i].caption for i in indices]}
        if self.posteriors is not None:
            cached = [self.posteriors[(i, f)] for i, f in zip(indices, flips, strict=True)]
            batch["posterior"] = torch.stack([c[0] for c in cached])  # (B, 2C, h, w)
            batch["time_ids"] = torch.stack([c[1] for c in cached])  # (B, 6)
        else:
            prepared = [self._pixels(self.train_set[i], f) for i, f in zip(indices, flips, strict=True)]
            batch["pixels"] = torch.stack([p.pixels for p in prepared])  # (B, 3, R, R)
            batch["time_ids"] = torch.stack([sdxl_time_ids(p.original_size, p.crop_top_left, self.resolution)
                                             for p in prepared])
        return batch

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["captions"])

    def tokens(self, batch: dict[str, Any]) -> int:
        return len(batch["captions"])  # images: the loop's tokens_per_s is images/s here

    def split(self, batch: dict[str, Any], parts: int) -> None:
        """Never split (``Task.split``): the noise and timesteps are drawn from the global generator."""
        return None

    def loss_sum(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._losses(batch, self.embeds).sum()

    def _losses(self, batch: dict[str, Any], embeds: dict | None) -> torch.Tensor:
        """Per-image losses (B,) of a collated batch; caption embeddings from ``embeds`` when cached."""
        device = self.pipe.device
        denoiser = getattr(self.pipe, self.denoiser)
        posterior = batch.get("posterior")
        if posterior is None:
            posterior = self.objective.posterior(batch["pixels"])
        latents = self.objective.latents(posterior.to(device, torch.float32)).to(denoiser.dtype)  # (B, C, h, w)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            if embeds is not None:
                first = embeds[batch["captions"][0]]
                cond = {k: torch.stack([embeds[c][k] for c in batch["captions"]]).to(device) for k in first}
            else:
                cond = self.objective.encode_captions(batch["captions"])
            return self.objective.loss(denoiser, latents, cond, batch.get("time_ids"))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss per validation image at fixed noise and timesteps (a generator seeded the same at every
        evaluation, so evaluations compare), leaving the training's random stream untouched."""
        if not self.val_set:
            return None
        device = self.pipe.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.cfg.train.seed + 1)
            self.model.eval()
            total, b = 0.0, self.cfg.train.batch_size
            for s in range(0, len(self.val_set), b):
                idx = list(range(s, min(s + b, len(self.val_set))))
                batch = {"captions": [self.val_set[i].caption for i in idx],
                         "posterior": torch.stack([self.val_posteriors[(i, False)][0] for i in idx]),
                         "time_ids": torch.stack([self.val_posteriors[(i, False)][1] for i in idx])}
                total += float(self._losses(batch, self.embeds).sum())
            self.model.train()
        return {"eval_loss": total / len(self.val_set)}

    def save_result(self, folder: Path) -> None:
        save_lora(folder, dict(self.model.items()), self.denoiser, base_model=self.cfg.model.name_or_path,
                  kohya=self.cfg.diffusion.kohya, sdxl=self.family == "sdxl")
