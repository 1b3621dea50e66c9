"""Text-to-image LoRA training: `lorakit train` vs the loop of diffusers' `train_text_to_image_lora.py`.

Same pipeline (examples/image-model), same data (examples/data/style/train.jsonl), same steps, batch size,
learning rate, LoRA rank/alpha and targets (to_q, to_k, to_v, to_out.0 of the UNet), AdamW, gradient
clipping 1.0, fp32, centre crop, no flip, epsilon objective. The diffusers side is that script's loop as a
user runs it (diffusers 0.42's examples/text_to_image/train_text_to_image_lora.py): an `accelerate`
Accelerator, `unet.add_adapter(peft.LoraConfig(...))`, a shuffled DataLoader of preprocessed images and
tokenized captions, and every step `vae.encode(...).latent_dist.sample()` and `text_encoder(input_ids)`,
then the UNet. Its torchvision transforms (Resize, CenterCrop, ToTensor, Normalize) are done with PIL and
numpy here (torchvision is not a lorakit dependency): the same arithmetic.

lorakit encodes each image and caption once before the loop (the VAE and the text encoder are frozen) and
samples a latent from the cached posterior every step; the loop then runs only the UNet. That is the
difference this measures, with lorakit's loop around it.

Each run is a fresh process, alternating (lorakit, diffusers, lorakit, ...). Per run: training images/s
over the loop (after the first step: warm-up), process wall time (imports, loading, caching, training,
saving: what the user waits for), peak RSS of the process alone (lorakit.usage). Medians, ratios.

    python benchmarks/diffusion_vs_diffusers.py [--repeats 3] [--steps 60] [--batch-size 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.usage import measured_popen, read_usage

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "image-model"
DATA = ROOT / "examples" / "data" / "style" / "train.jsonl"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's target_modules


def lorakit_args(a: argparse.Namespace, output: Path) -> list[str]:
    return ["-m", "lorakit", "train", "--model", str(a.model), "--data", str(a.data), "--output", str(output),
            "--overwrite", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--r", str(a.r), "--alpha", str(a.r), "--target", ",".join(TARGETS), "--resolution", str(a.resolution),
            "--precision", "fp32", "--log-every", "1", "--threads", str(a.threads), "--seed", "0",
            "--weight-decay", "0.01"]


def lorakit_rate(output: Path, batch_size: int) -> tuple[float, list[float]]:
    """Training images/s over steps 2..N of a finished run (metrics.jsonl: each step's images/s) and losses."""
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "tokens_per_s" in r]
    timed = steps[1:]
    return len(timed) * batch_size / sum(batch_size / r["tokens_per_s"] for r in timed), [r["loss"] for r in steps]


def diffusers_child(a: argparse.Namespace, output: Path, result: Path) -> None:
    """diffusers' train_text_to_image_lora.py loop, in this fresh process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True)
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=a.r, lora_alpha=a.r, init_lora_weights="gaussian", target_modules=TARGETS))
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=a.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)

    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]

    def transform(image: Image.Image) -> torch.Tensor:  # Resize(bilinear), CenterCrop, ToTensor, Normalize([.5], [.5])
        w, h = image.size
        s = a.resolution / min(w, h)
        image = image.resize((max(a.resolution, round(w * s)), max(a.resolution, round(h * s))), Image.BILINEAR)
        left, top = (image.size[0] - a.resolution) // 2, (image.size[1] - a.resolution) // 2
        image = image.crop((left, top, left + a.resolution, top + a.resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2.0 - 1.0

    examples = [{"pixel_values": transform(Image.open(Path(a.data).parent / r["image"]).convert("RGB")),
                 "input_ids": tokenizer(r["text"], max_length=tokenizer.model_max_length, padding="max_length",
                                        truncation=True, return_tensors="pt").input_ids[0]} for r in rows]

    def collate_fn(batch):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in batch]).contiguous().float(),
                "input_ids": torch.stack([e["input_ids"] for e in batch])}

    loader = torch.utils.data.DataLoader(examples, shuffle=True, collate_fn=collate_fn, batch_size=a.batch_size,
                                         num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=a.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    losses, stamps, step = [], [], 0
    unet.train()
    while step < a.steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            stamps.append(time.perf_counter())
            step += 1
            if step == a.steps:
                break
    unet = accelerator.unwrap_model(unet)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(output), unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), safe_serialization=True)
    timed = len(stamps) - 1
    result.write_text(json.dumps({"images_per_s": timed * a.batch_size / (stamps[-1] - stamps[0]), "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child-diffusers", nargs=2, metavar=("OUTPUT", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_diffusers:
        diffusers_child(a, Path(a.child_diffusers[0]), Path(a.child_diffusers[1]))
        return

    from lorakit.device import hardware_summary

    # no MLflow tracking in lorakit's runs: the diffusers loop logs nothing either
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "LORAKIT_TRACK": "0"}
    runs: dict[str, list[dict]] = {"lorakit": [], "diffusers": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for name in ("lorakit", "diffusers"):
                out, result = Path(tmp) / f"{name}-{i}", Path(tmp) / f"{name}-{i}.json"
                if name == "lorakit":
                    cmd = [sys.executable, *lorakit_args(a, out)]
                else:
                    cmd = [sys.executable, __file__, *sys.argv[1:], "--child-diffusers", str(out), str(result)]
                start = time.perf_counter()
                proc = measured_popen(cmd, Path(tmp) / f"{name}-{i}.usage", env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
                _, err = proc.communicate()
                if proc.returncode != 0:
                    sys.exit(f"{name} run {i} failed:\n{err[-3000:]}")
                usage = read_usage(Path(tmp) / f"{name}-{i}.usage")
                if name == "lorakit":
                    rate, losses = lorakit_rate(out, a.batch_size)
                else:
                    r = json.loads(result.read_text())
                    rate, losses = r["images_per_s"], r["losses"]
                runs[name].append({"images_per_s": rate, "wall_s": time.perf_counter() - start,
                                   "peak_rss_mb": usage.peak_rss_mb, "cpu_s": usage.cpu_s,
                                   "last10_loss": statistics.mean(losses[-10:])})
                print(f"round {i + 1} {name:9s} {rate:7.2f} images/s  wall {runs[name][-1]['wall_s']:6.1f} s  "
                      f"peak RSS {usage.peak_rss_mb:6.0f} MiB  loss(last 10) {runs[name][-1]['last10_loss']:.4f}",
                      flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print(f"\n{a.steps} steps x {a.batch_size} images ({a.resolution} px), LoRA r={a.r} on {','.join(TARGETS)}, "
          f"lr {a.lr:g}, fp32, {a.threads} thread(s); medians of {a.repeats} alternating rounds")
    for key, unit in (("images_per_s", "images/s"), ("wall_s", "s wall"), ("peak_rss_mb", "MiB peak RSS"),
                      ("cpu_s", "s CPU")):
        lk, df = med("lorakit", key), med("diffusers", key)
        print(f"{unit:>13}: lorakit {lk:8.2f}  diffusers {df:8.2f}  ratio {lk / df:.2f}x")
    print(f"hardware: {hardware_summary()}")
    print(f"load average: {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
