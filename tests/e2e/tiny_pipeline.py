"""A tiny StableDiffusionPipeline built from diffusers/transformers configs (random weights) and a few
captioned PNGs: what the text-to-image tests train and generate with, offline, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESOLUTION = 32  # pixels; latents 16×16 (VAE factor 2)
CAPTIONS = ["a red square", "a blue circle", "a green square", "a yellow circle", "a red circle", "a blue square"]


def char_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over single characters (CLIP's byte alphabet, no merges), built without files."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)] + ["Ġ"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=RESOLUTION)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_images(folder: Path, n: int = 6, size: int = 40) -> Path:
    """``n`` captioned PNGs (a coloured shape on grey, ``size`` px, not square-cropped) and data.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    lines = []
    for i in range(n):
        caption = CAPTIONS[i % len(CAPTIONS)]
        x = np.full((size, size + 8, 3), 128, dtype=np.uint8)
        c = colours[caption.split()[1]]
        lo, hi = sorted(rng.integers(4, size - 4, 2))
        x[lo:hi + 4, lo:hi + 4] = c
        Image.fromarray(x).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "text": caption}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"
