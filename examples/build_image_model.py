"""Build lorakit's bundled text-to-image pipeline, offline: ``examples/image-model``.

There is no tiny pretrained text-to-image model to install, so this script pretrains one from nothing on
procedurally drawn captioned images (``image_scenes.py``: "a large red circle on the left on a gray
background"). The result is an ordinary diffusers ``StableDiffusionPipeline`` folder:

  vae/            AutoencoderKL, 32×32 RGB <-> 8×8×4 latents (factor 4)
  text_encoder/   CLIPTextModel, 2 layers × 64 wide
  tokenizer/      CLIPTokenizer: CLIP's byte-level BPE layout, merges built from the caption words
  unet/           UNet2DConditionModel, 2 levels (64, 128 channels), cross-attention to the captions
  scheduler/      DPMSolverMultistepScheduler (training used DDPM's scaled-linear betas, 1000 steps)

Three stages, each with fixed seeds and one thread (so a rerun on the same CPU and library versions
rebuilds the same weights):

1. the VAE, a quarter of its scenes in colours drawn uniformly from RGB (meant to let it encode any colour;
   at 800 steps it still favours the named ones: see the model card), L1 + MSE + a small KL term;
2. latents of a fixed set of named-colour scenes, cached once (mean and std of the VAE's posterior);
3. the text encoder and UNet together, epsilon prediction, min-SNR-γ=5 loss weights, 10% empty captions
   (for classifier-free guidance), an exponential moving average of the UNet weights.

Then it measures what the model learned (generated background/shape colour and position against the
caption, on held-out scenes) and writes README.md's figures to build_info.json and a sample grid.

    python examples/build_image_model.py                         # 50 min on one core of a busy 2-core machine (load 12)
    python examples/build_image_model.py --vae-steps 20 --unet-steps 20 --scenes 256 --out /tmp/im
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (a shared CPU); must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from image_scenes import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    render,
    sample_scene,
)

SEED = 0
MAX_LENGTH = 32  # caption tokens, with <|startoftext|> and <|endoftext|>
GUIDANCE = 4.0  # classifier-free guidance used for the model card's figures
SAMPLE_STEPS = 20


# --- the tokenizer: CLIP's layout, built offline ---------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer(words: list[str]) -> CLIPTokenizer:
    """CLIP's vocabulary layout (256 byte characters, the same with ``</w>``, merged tokens, then the two
    special tokens) with merges that build each caption word whole, right to left; any other word (a
    trigger word such as "zwx") falls apart into characters the model never saw in training."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[-2], parts[-1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = parts[:-2] + [pair[0] + pair[1]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def save_vocab_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for transformers 4.x's slow CLIPTokenizer."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def caption_words() -> list[str]:
    text = " ".join([*SHAPES, *COLOURS, *BACKGROUNDS, *POSITIONS, *SIZES, "a on background"])
    return sorted(set(text.split()))


# --- the models ------------------------------------------------------------------------------------------


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))  # (B, H, W, 3)
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- stage 1: the VAE ------------------------------------------------------------------------------------


def train_vae(steps: int, batch: int, log) -> tuple[AutoencoderKL, float]:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED + 1)
    held_rng = np.random.default_rng(SEED + 9)
    held = to_tensor([render(sample_scene(held_rng)) for _ in range(64)])
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    mse = float("nan")
    for step in range(steps):
        # a quarter uniform-RGB scenes (towards decoding any colour), the rest named colours
        x = to_tensor([render(sample_scene(rng, random_colours=i % 4 == 0)) for i in range(batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        total = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 50)
        total.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                mse = F.mse_loss(vae.decode(vae.encode(held).latent_dist.mode()).sample, held).item()
            log(f"vae step {step + 1}/{steps}: held-out reconstruction MSE {mse:.5f} (pixels in [-1, 1])")
    vae.eval().requires_grad_(False)
    return vae, mse


# --- stage 2 + 3: cached latents, then text encoder + UNet -------------------------------------------------


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, n: int, batch: int = 64) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions and the VAE posterior (mean, std) of ``n`` named-colour scenes."""
    rng = np.random.default_rng(SEED + 2)
    scenes = [sample_scene(rng) for _ in range(n)]
    means, stds = [], []
    for i in range(0, n, batch):
        d = vae.encode(to_tensor([render(s) for s in scenes[i:i + batch]])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return [s.caption for s in scenes], torch.cat(means), torch.cat(stds)  # latents (n, 4, 8, 8)


def train_denoiser(vae, tokenizer, captions, means, stds, steps, batch, lr, log):
    torch.manual_seed(SEED + 3)
    gen = torch.Generator().manual_seed(SEED + 4)
    scaling = 1.0 / float(torch.cat([means, stds]).std())  # unit-variance latents, as SD's 0.18215
    text_encoder, unet, sched = make_text_encoder(tokenizer), make_unet(), noise_scheduler()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids  # (N, 32)
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    snr_gamma, ema_decay, smooth = 5.0, 0.998, None
    for step in range(steps):
        idx = torch.randint(0, len(captions), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        tokens = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # empty captions: the unconditional model for CFG
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        cond = text_encoder(tokens)[0]  # (B, 32, 64)
        pred = unet(noisy, t, cond).sample
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-γ (Hang et al. 2023), epsilon target
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps}: loss {loss.item():.4f} (smoothed {smooth:.4f})")
    unet.load_state_dict(ema)
    vae.register_to_config(scaling_factor=scaling)
    return text_encoder.eval(), unet.eval(), smooth, scaling


# --- what the model learned --------------------------------------------------------------------------------


def nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(d.argmin())]


def judge(image: Image.Image, scene) -> dict[str, bool]:
    """Background colour (median of the border), shape colour (median of the pixels far from the
    background) and position (their centroid's nearest named position) against the caption."""
    x = np.asarray(image, dtype=np.float32)  # (32, 32, 3)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, 0)
    far = np.linalg.norm(x - bg, axis=-1) > 60
    ok = {"background": nearest(bg, BACKGROUNDS) == scene.background, "colour": False, "position": False}
    if far.sum() >= 4:
        ok["colour"] = nearest(np.median(x[far], 0), COLOURS) == scene.colour
        ys, xs = np.nonzero(far)
        c = np.array([xs.mean(), ys.mean()]) / SIZE
        names = list(POSITIONS)
        ok["position"] = names[int(np.linalg.norm(np.asarray([POSITIONS[n] for n in names]) - c, axis=1)
                                   .argmin())] == scene.position
    return ok


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, n: int) -> tuple[dict[str, float], list, list]:
    rng = np.random.default_rng(SEED + 5)  # scenes the training set did not fix (other seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = []
    for i in range(0, n, 16):
        chunk = scenes[i:i + 16]
        images += pipe([s.caption for s in chunk], num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                       generator=torch.Generator().manual_seed(i), height=SIZE, width=SIZE).images
    verdicts = [judge(im, s) for im, s in zip(images, scenes, strict=True)]
    acc = {f"{k}_accuracy": round(sum(v[k] for v in verdicts) / n, 4) for k in ("background", "colour", "position")}
    return acc, scenes, images


def sample_grid(images, scenes, path: Path, cols: int = 4, zoom: int = 4) -> None:
    cell = SIZE * zoom
    grid = Image.new("RGB", (cols * cell, math.ceil(len(images) / cols) * (cell + 24)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, s) in enumerate(zip(images, scenes, strict=True)):
        x, y = (i % cols) * cell, (i // cols) * (cell + 24)
        grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words = s.caption.removeprefix("a ").split(" on a ")
        draw.text((x + 2, y + cell + 1), words[0], fill="black")
        draw.text((x + 2, y + cell + 12), "on " + words[1], fill="black")
    grid.save(path)


# --- the model card ----------------------------------------------------------------------------------------


def model_card(f: dict) -> str:
    """README.md of the built pipeline, from its build_info.json figures."""
    p = f["params"]
    shapes, colours, backgrounds = ", ".join(SHAPES), ", ".join(COLOURS), ", ".join(BACKGROUNDS)
    positions, sizes = ", ".join(POSITIONS), ", ".join(SIZES)
    return f"""# lorakit tiny text-to-image pipeline

A small diffusers `StableDiffusionPipeline` pretrained from nothing, offline, on procedurally drawn
captioned pictures of one coloured shape on a plain background ("a large red circle on the left on a gray
background"), {f['resolution']}×{f['resolution']} pixels. It exists so that `lorakit quickstart --images`, the examples and
the benchmark can train a text-to-image LoRA on a laptop CPU with no network, on a base that really
follows its captions, as the text side ships `examples/base-model`.

**A demonstration model for its own task.** It draws the scenes of its training captions and nothing
else; a word it never saw (a trigger word such as "zwx") means nothing to it until a LoRA teaches it. For
real work, pass a real pipeline with `--model` (a diffusers folder or hub id: SD 1.x/2.x, SDXL, SD3, Flux).

Rebuild (deterministic: fixed seeds and one thread; on the same CPU and library versions a rebuild writes
byte-identical weights):

```bash
python examples/build_image_model.py            # about {max(1, round(f['total_seconds'] / 60))} min on one core at load {f['load_average']:g}
```

## Components

| folder | class | parameters | what |
|---|---|---|---|
| `unet/` | `UNet2DConditionModel` | {p['unet']:,} | 2 levels (64, 128 channels), `CrossAttnDownBlock2D`/`CrossAttnUpBlock2D` at both, cross-attention to 64-wide caption states |
| `vae/` | `AutoencoderKL` | {p['vae']:,} | {f['resolution']}×{f['resolution']} RGB <-> {'×'.join(map(str, f['latent']))} latents (factor 4), `scaling_factor` {f['scaling_factor']:g} |
| `text_encoder/` | `CLIPTextModel` | {p['text_encoder']:,} | 2 layers × 64 wide, {MAX_LENGTH} tokens |
| `tokenizer/` | `CLIPTokenizer` | | CLIP's byte-level BPE layout, {f['vocab_size']} entries: merges that build each caption word whole |
| `scheduler/` | `DPMSolverMultistepScheduler` | | training used DDPM's scaled-linear betas (0.00085-0.012), 1000 steps, epsilon prediction |

{sum(p.values()):,} parameters in all, float32 safetensors, {f['size_bytes'] / 1e6:.1f} MB on disk. LoRA target names
(lorakit's default): `to_q to_k to_v to_out.0` of every attention block of the UNet.

## Training data

Scenes drawn by `examples/image_scenes.py` (anti-aliased, 8× supersampled): one shape ({shapes}), of a
named colour ({colours}), size ({sizes}) and position ({positions}, jittered), on a
background ({backgrounds}). The caption names all five. The quickstart's "zwx" palette
(teal background, sky-blue shape, cerulean outline) is never drawn in them.

## Training

1. the VAE: {f['vae_steps']} steps of {f['vae_batch']} scenes, a quarter of them in uniformly random RGB colours (towards
   encoding any colour; see Limitations), L1 + MSE + 1e-6 KL, AdamW lr 1e-3, cosine;
2. the latents (posterior mean and std) of {f['scenes']:,} named-colour scenes, cached once;
3. the text encoder and the UNet together: {f['unet_steps']} steps of {f['unet_batch']}, AdamW peak lr {f['peak_lr']:g} (warmup
   100, cosine), epsilon prediction, min-SNR-γ=5 weights, 10% empty captions (for classifier-free
   guidance), gradient clipping 1.0, an exponential moving average (0.998) of the UNet's weights.

| figure | value |
|---|---|
| VAE held-out reconstruction MSE (pixels in [-1, 1]) | {f['vae_heldout_mse']:.4f} |
| UNet final loss (smoothed) | {f['unet_final_loss_smoothed']:.4f} |
| generated background colour = caption's, {f['eval_scenes']} held-out captions | {f['background_accuracy']:.0%} |
| generated shape colour = caption's | {f['colour_accuracy']:.0%} |
| generated shape position = caption's | {f['position_accuracy']:.0%} |
| VAE stage / whole build | {f['vae_seconds'] / 60:.1f} / {f['total_seconds'] / 60:.1f} min, {f['threads']} thread, load average {f['load_average']:g} |

The accuracies judge generated images ({f['sample_steps']} DPM-Solver steps, guidance {f['guidance_scale']:g}, a seed per batch)
against captions of scenes the training did not fix: the background's colour is the median of the
border pixels, the shape's colour the median of the pixels far from it, its position their centroid,
each matched to the nearest named value. `samples.png` shows 16 of them under their captions.

## Use

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("examples/image-model")
image = pipe("a large red circle on the left on a gray background", num_inference_steps={f['sample_steps']},
             guidance_scale={f['guidance_scale']:g}, height={f['resolution']}, width={f['resolution']}).images[0]
```

or `lorakit generate-image --model examples/image-model --prompt "..." --guidance {f['guidance_scale']:g}`.

## Limitations

A toy: {f['resolution']}×{f['resolution']} pixels, one shape per picture, a vocabulary of about thirty words; a
caption outside that grammar gives an arbitrary scene. Its VAE ({f['vae_steps']} steps) draws the named colours of
the captions far better than any other: measured on the 800-step build, an indigo comes back as a dark
green and only 2 of 125 flat test colours within 0.1, so the quickstart's palette is made of colours it does
reproduce. Built with torch {f['torch']}, diffusers
{f['diffusers']}, transformers {f['transformers']}, Python {f['python']} (commit {f['commit'] or 'unknown'}).
Apache-2.0, as lorakit; its data are drawn by the script, so it inherits no other dataset's terms.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "image-model"))
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--scenes", type=int, default=8192, help="cached training scenes for the UNet")
    ap.add_argument("--unet-steps", type=int, default=1200)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval", type=int, default=64, help="held-out scenes generated for the figures")
    ap.add_argument("--threads", type=int, default=1, help="1: deterministic, and fastest on a shared CPU")
    ap.add_argument("--card", action="store_true", help="only rewrite OUT/README.md from OUT/build_info.json")
    a = ap.parse_args()
    out = Path(a.out)
    if a.card:
        (out / "README.md").write_text(model_card(json.loads((out / "build_info.json").read_text())))
        return
    torch.set_num_threads(a.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    tokenizer = build_tokenizer(caption_words())
    vae, vae_mse = train_vae(a.vae_steps, a.vae_batch, log)
    t_vae = time.perf_counter() - start
    captions, means, stds = encode_scenes(vae, a.scenes)
    log(f"cached latents of {len(captions)} scenes {tuple(means.shape)}")
    text_encoder, unet, unet_loss, scaling = train_denoiser(vae, tokenizer, captions, means, stds, a.unet_steps,
                                                            a.unet_batch, a.lr, log)
    t_train = time.perf_counter() - start
    sched = DPMSolverMultistepScheduler.from_config(noise_scheduler().config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    acc, scenes, images = evaluate(pipe, a.eval)
    log(f"held-out accuracy: {acc}")
    pipe.save_pretrained(out, safe_serialization=True)
    save_vocab_files(tokenizer, out / "tokenizer")
    sample_grid(images[:16], scenes[:16], out / "samples.png")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__,
        "params": {"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder)},
        "vocab_size": len(tokenizer), "resolution": SIZE, "latent": [4, SIZE // 4, SIZE // 4],
        "vae_steps": a.vae_steps, "vae_batch": a.vae_batch, "vae_heldout_mse": round(vae_mse, 6),
        "scenes": a.scenes, "unet_steps": a.unet_steps, "unet_batch": a.unet_batch, "peak_lr": a.lr,
        "unet_final_loss_smoothed": round(unet_loss, 5), "scaling_factor": round(scaling, 5),
        "eval_scenes": a.eval, "guidance_scale": GUIDANCE, "sample_steps": SAMPLE_STEPS, **acc,
        "threads": a.threads, "vae_seconds": round(t_vae, 1), "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - start, 1), "load_average": round(os.getloadavg()[0], 2),
        "size_bytes": size, "commit": commit,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    log(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
