"""The denoising objective of one pipeline: its conditioning, its noise, its target, its loss weights.

UNet pipelines (SD 1.x/2.x/SDXL) train as DDPM (Ho et al. 2020): x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε with t uniform
in [0, T), and the denoiser predicts the scheduler's ``prediction_type``: ε (epsilon) or
v = √ᾱ_t·ε - √(1-ᾱ_t)·x₀ (v_prediction, Salimans & Ho 2022). Optional min-SNR-γ weights (Hang et al. 2023,
eq. 4 and its v form): w = min(SNR_t, γ)/SNR_t for ε, min(SNR_t, γ)/(SNR_t + 1) for v. Optional noise
offset: ε + o·n with n ~ N(0, 1) per image and channel (Guttenberg 2023).

SD3 and Flux train with flow matching (Esser et al. 2024, rectified flow): x_σ = (1-σ)·x₀ + σ·ε with
σ from a logit-normal density over the scheduler's timesteps, and the denoiser predicts the velocity ε - x₀.

Everything random comes from torch's global generator (checkpoints restore it: exact resume). All of it
is diffusers' own training scripts' arithmetic (``train_text_to_image_lora.py``, ``train_dreambooth_lora_sd3.py``,
``train_dreambooth_lora_flux.py``), so a loss here means what it means there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.config import DiffusionConfig
from lorakit.errors import LorakitError

FLUX_GUIDANCE = 3.5  # the distilled guidance a guidance-embedding Flux transformer is trained at (diffusers' default)


class Objective:
    """What ``loss`` computes for ``pipe`` (a loaded pipeline of ``family``) under ``cfg``."""

    def __init__(self, pipe: Any, family: str, cfg: DiffusionConfig):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.pipe, self.family = pipe, family
        self.flow = family in ("sd3", "flux")
        vae = pipe.vae.config
        self.scaling = float(vae.get("scaling_factor") or 1.0)
        self.shift = float(vae.get("shift_factor") or 0.0)
        if self.flow:
            if cfg.prediction_type != "auto" or cfg.snr_gamma or cfg.noise_offset:
                raise LorakitError(f"{family.upper()} trains with flow matching: --prediction-type, --snr-gamma and "
                                   "--noise-offset apply to UNet (DDPM) pipelines only")
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.prediction = "flow"
        else:
            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.prediction = (self.scheduler.config.prediction_type if cfg.prediction_type == "auto"
                               else cfg.prediction_type)
            if self.prediction not in ("epsilon", "v_prediction"):
                raise LorakitError(f"the pipeline's scheduler predicts {self.prediction!r}; lorakit trains epsilon "
                                   "and v_prediction (set --prediction-type)")
        self.snr_gamma, self.noise_offset = cfg.snr_gamma, cfg.noise_offset

    # --- inputs -------------------------------------------------------------------------------------------

    def latents(self, posterior: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) sampled from the VAE posterior's parameters (B, 2C, h, w) = (mean,
        log-variance) — what ``vae.encode(x).latent_dist.sample()`` draws, from the global generator."""
        mean, logvar = posterior.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return (z - self.shift) * self.scaling

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> Tensor:
        """The frozen VAE's posterior parameters (B, 2C, h, w) of images (B, 3, H, W) in [-1, 1]."""
        vae = self.pipe.vae
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float().cpu()

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """The text conditioning of a batch of captions, each tensor batch-first: ``prompt_embeds``
        (B, L, D), plus ``pooled_prompt_embeds`` (B, P) for SDXL/SD3/Flux. Gradients flow when the text
        encoders hold trainable LoRA weights; call under ``torch.no_grad()`` to cache."""
        pipe, device = self.pipe, self.pipe.device
        if self.family == "sd":
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return {"prompt_embeds": embeds}
        if self.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device)
        elif self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                      do_classifier_free_guidance=False)
        else:  # sdxl
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # --- the loss --------------------------------------------------------------------------------------------

    def loss(self, denoiser: torch.nn.Module, latents: Tensor, cond: dict[str, Tensor],
             time_ids: Tensor | None = None) -> Tensor:
        """Per-image loss (B,): the weighted mean squared error of the denoiser's prediction over its
        latent elements. ``latents`` (B, C, h, w) scaled; ``time_ids`` (B, 6) for SDXL."""
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        if self.flow:
            return self._flow_loss(denoiser, latents, noise, cond)
        b = latents.shape[0]
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((b, latents.shape[1], 1, 1), device=latents.device,
                                                            dtype=latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), device=latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        kwargs: dict[str, Any] = {}
        if self.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"],
                                           "time_ids": time_ids.to(latents.device, latents.dtype)}
        pred = denoiser(noisy, t, cond["prompt_embeds"], return_dict=False, **kwargs)[0]
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, t)
            clipped = torch.clamp(snr, max=self.snr_gamma)
            mse = mse * (clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1))
        return mse

    def _flow_loss(self, denoiser: torch.nn.Module, latents: Tensor, noise: Tensor, cond: dict[str, Tensor]) -> Tensor:
        b, c, h, w = latents.shape
        sched = self.scheduler
        u = torch.sigmoid(torch.randn((b,), device="cpu"))  # logit-normal(0, 1) over [0, 1]
        idx = (u * sched.config.num_train_timesteps).long().clamp(max=len(sched.timesteps) - 1)
        t = sched.timesteps[idx].to(latents.device)
        sigma = sched.sigmas[idx].to(latents.device, latents.dtype).view(b, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        target = noise - latents  # the rectified-flow velocity
        if self.family == "sd3":
            pred = denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        else:  # flux: 2×2 latent patches as tokens, with their (0, row, column) ids
            from diffusers import FluxPipeline

            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # (B, h/2·w/2, 4C)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
            txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
            guidance = None
            if denoiser.config.get("guidance_embeds"):
                guidance = torch.full((b,), FLUX_GUIDANCE, device=latents.device, dtype=latents.dtype)
            pred = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            scale = self.pipe.vae_scale_factor
            pred = FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, resolution, resolution], dtype=torch.float32)
