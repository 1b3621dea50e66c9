"""A tiny StableDiffusionPipeline built from diffusers/transformers configs (random weights) and a few
captioned PNGs: what the text-to-image tests train and generate with, offline, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESOLUTION = 16  # pixels; latents 8×8 (VAE factor 2)
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
    (folder / "val.jsonl").write_text("\n".join(lines[:2]) + "\n")  # two of them, for evaluation
    return folder / "data.jsonl"


def t5_tokenizer():
    """A T5 tokenizer over lower-case letters (Unigram pieces, no files)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def build_other_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL, SD3 or Flux pipeline (diffusers' own test shapes), saved to ``folder``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    tok = char_tokenizer()

    def clip(cls, hidden: int = 32, projection: int = 32):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=16, projection_dim=projection,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, hidden_act="gelu"))

    def t5():
        return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8))

    if kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=32)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=32, sample_size=RESOLUTION)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip(CLIPTextModel), text_encoder_2=clip(CLIPTextModelWithProjection), tokenizer=tok,
            tokenizer_2=char_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True)
    elif kind == "sd3":
        transformer = SD3Transformer2DModel(sample_size=RESOLUTION, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        vae = AutoencoderKL(sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=(4,),
                            layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=clip(CLIPTextModelWithProjection), tokenizer=tok,
            text_encoder_2=clip(CLIPTextModelWithProjection), tokenizer_2=char_tokenizer(),
            text_encoder_3=t5(), tokenizer_3=t5_tokenizer())
    else:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        vae = AutoencoderKL(sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=(4,),
                            layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
        pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=clip(CLIPTextModel), tokenizer=tok, text_encoder_2=t5(),
                            tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
