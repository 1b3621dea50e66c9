"""Text-to-image LoRA end to end on a tiny StableDiffusionPipeline (random weights, built from configs):
training lowers the loss and changes only LoRA weights; diffusers' own loader reads the adapter (diffusers
and kohya layouts) and makes lorakit generate-image's image; resume after SIGKILL; bad data named by line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.train.loop import train
from tests.conftest import sigkill_once
from tests.e2e.tiny_pipeline import RESOLUTION, build_pipeline, write_images

pytest.importorskip("diffusers")

FLAGS = {"max_steps": 6, "batch_size": 2, "lr": "1e-2", "r": 4, "alpha": 8, "precision": "fp32", "threads": 1,
         "log_every": 1, "save_every": 2, "keep_last": 5, "seed": 0}
STEPS, SEED, PROMPT = 3, 3, "a red square"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(base, data, tmp_path_factory) -> Path:
    """One trained adapter (diffusers + kohya files), validated on the training images at every step."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    train(load_config(None, {**FLAGS, "model": str(base), "data": str(data), "val_data": str(data.parent / "val.jsonl"),
                             "eval_every": 1, "kohya": True, "output": str(out)}))
    return out


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _diffusers_image(pipe, scale: float | None = None) -> np.ndarray:
    kwargs = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    return _pixels(pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                        **kwargs).images[0])


def _lorakit_image(base: Path, adapter: Path | None, scale: float, tmp: Path) -> np.ndarray:
    out = tmp / f"lorakit-{scale}.png"
    args = ["generate-image", "--model", str(base), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
            "--out", str(out)]
    if adapter is not None:
        args += ["--adapter", str(adapter), "--scale", str(scale)]
    assert main(args) == 0
    return _pixels(Image.open(out))


def _pipeline(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_training_lowers_the_loss_and_changes_only_lora_weights(run, base):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == FLAGS["max_steps"] and evals[-1] < evals[0], evals
    trainable = load_file(run / "checkpoints" / "step-6" / "trainable.safetensors")
    assert trainable and all(".adapters.default.lora_" in k for k in trainable), sorted(trainable)[:3]
    assert {k.split(".")[0] for k in trainable} == {"unet"}
    # the default targets: the attention projections of every transformer block
    names = {k.split(".adapters.")[0].rsplit(".", 1)[-1] for k in trainable}
    assert names == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert any(float(v.abs().max()) > 0 for k, v in trainable.items() if "lora_B" in k)
    files = sorted(p.name for p in run.iterdir())
    assert files == ["adapter_config.json", "checkpoints", "config.yaml", "lora_kohya.safetensors", "metrics.jsonl",
                     "pytorch_lora_weights.safetensors"]
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base.resolve())


def test_diffusers_loads_the_adapter_and_makes_the_same_image(run, base, tmp_path):
    pipe = _pipeline(base)
    base_image = _diffusers_image(pipe)
    pipe.load_lora_weights(str(run))  # unchanged: pytorch_lora_weights.safetensors with its alpha header
    for scale in (0.5, 1.0):
        ours = _lorakit_image(base, run, scale, tmp_path)
        theirs = _diffusers_image(pipe, scale)
        assert np.abs(ours - theirs).max() <= 1, scale  # ≤ 1/255 per pixel, fp32
        assert np.abs(ours - base_image).max() >= 8, scale  # the adapter does change the image
    assert np.array_equal(_lorakit_image(base, run, 0.0, tmp_path), base_image)  # scale 0 is the base exactly


def test_two_adapters_with_weights_match_diffusers_set_adapters(run, base, data, tmp_path):
    """--adapter A --adapter B --adapter-weights 0.7,0.4 is diffusers' set_adapters([a, b], [0.7, 0.4]); a
    grid of --scales has one labelled column per scale."""
    other = tmp_path / "other"
    train(load_config(None, {**FLAGS, "model": str(base), "data": str(data), "output": str(other), "max_steps": 2,
                             "save_every": 0, "seed": 1, "lr": "3e-2"}))
    pipe = _pipeline(base)
    pipe.load_lora_weights(str(run), adapter_name="a")
    pipe.load_lora_weights(str(other), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    theirs = _diffusers_image(pipe)
    out = tmp_path / "both.png"
    assert main(["generate-image", "--model", str(base), "--adapter", str(run), "--adapter", str(other),
                 "--adapter-weights", "0.7,0.4", "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
                 "--out", str(out)]) == 0
    ours = _pixels(Image.open(out))
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - _lorakit_image(base, run, 0.7, tmp_path)).max() >= 8  # the second adapter counts
    grid = tmp_path / "grid.png"
    assert main(["generate-image", "--adapter", str(run), "--prompt", PROMPT, "--scales", "0,0.5,1", "--seeds", "0,1",
                 "--steps", "2", "--out", str(grid)]) == 0  # --model from the adapter's config
    width, height = Image.open(grid).size
    assert width > 3 * 256 and height > 2 * 256  # three columns, two rows of 256-px cells, labels around

def test_kohya_file_loaded_by_diffusers_makes_the_same_image(run, base, tmp_path):
    kohya = load_file(run / "lora_kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".lora_down.weight") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    pipe = _pipeline(base)
    pipe.load_lora_weights(str(run), weight_name="lora_kohya.safetensors")
    theirs = _diffusers_image(pipe)
    assert np.abs(_lorakit_image(base, run, 1.0, tmp_path) - theirs).max() <= 1
    # lorakit reads the kohya file back too
    assert np.abs(_lorakit_image(base, run / "lora_kohya.safetensors", 1.0, tmp_path) - theirs).max() <= 1
    # lorakit export --format kohya writes the same layout from the diffusers file, after training
    assert main(["export", "--adapter", str(run), "--format", "kohya", "--output", str(tmp_path / "kohya")]) == 0
    exported = load_file(tmp_path / "kohya" / f"{run.name}.safetensors")
    assert exported.keys() == kohya.keys() and all(torch.equal(exported[k], kohya[k]) for k in kohya)
    pipe = _pipeline(base)
    pipe.load_lora_weights(str(tmp_path / "kohya"), weight_name=f"{run.name}.safetensors")
    assert np.abs(_diffusers_image(pipe) - theirs).max() <= 1


def test_resume_after_sigkill_gives_the_same_adapter(run, base, data, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lorakit", "train", "--model", str(base), "--data", str(data), "--val-data",
            str(data.parent / "val.jsonl"), "--eval-every", "1", "--kohya", "--output", str(out)]
    for k, v in FLAGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "HF_HUB_OFFLINE": "1"}
    sigkill_once(args, out / "checkpoints" / "step-2", timeout=120, env=env)
    assert not (out / "checkpoints" / "step-6").exists()  # killed mid-run
    train(load_config(str(out / "config.yaml"), {"resume": True}))
    resumed, straight = load_file(out / "pytorch_lora_weights.safetensors"), load_file(run / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_bad_image_data_is_named_by_file_and_line(base, data, tmp_path, capsys):
    folder = data.parent
    good = folder / "img0.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"image": str(good), "text": "a red square"}),
        json.dumps({"image": "truncated.png", "text": "half a file"}),
        json.dumps({"image": str(good)}),
        json.dumps({"image": "missing.png", "text": "no such file"}),
    ]) + "\n")
    out = tmp_path / "never"
    code = main(["train", "--model", str(base), "--data", str(bad), "--output", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:3: no \"text\" caption" in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written
    bad.write_text("\n".join(bad.read_text().splitlines()[:2]) + "\n")  # only the truncated image is left bad
    assert main(["train", "--model", str(base), "--data", str(bad), "--output", str(out), "--max-steps", "1"]) == 2
    assert f"{bad}:2: cannot read image {truncated}" in capsys.readouterr().err and not out.exists()


def test_data_check_lists_every_problem_and_warning(base, data, tmp_path, capsys):
    folder = data.parent
    good = (folder / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.open(folder / "img0.png").resize((12, 12)).save(tmp_path / "small.png")
    bad = tmp_path / "bad.jsonl"
    lines = [{"image": str(folder / "img0.png"), "text": "a red square"},
             {"image": "truncated.png", "text": "half a file"},
             {"image": str(folder / "img1.png")},
             {"image": "missing.png", "text": "no such file"},
             {"image": "small.png", "text": "a tiny copy " + "and more words " * 3},
             {"image": str(folder / "img0.png"), "text": "the same picture again"}]
    bad.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert main(["data", "check", str(bad), "--model", str(base)]) == 1
    out = capsys.readouterr().out
    for expected in (f"{bad}:2: cannot read image", f"{bad}:3: no \"text\" caption", f"{bad}:4: image",
                     f"{bad}:5: small.png is 12×12, smaller than --resolution {RESOLUTION}",
                     f"{bad}:6: img0.png is a duplicate of {bad}:1",
                     f"{bad}:5: caption has"):
        assert expected in out, (expected, out)
    # a folder of images with same-named .txt captions: a missing caption names the image
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "a.png").write_bytes(good)
    (shots / "a.txt").write_text("a red square")
    (shots / "b.png").write_bytes(good)
    assert main(["data", "check", str(shots), "--model", str(base)]) == 1
    out = capsys.readouterr().out
    assert f"{shots / 'b.png'}: no caption file b.txt" in out


@pytest.mark.parametrize("kind", ["sd-v-te", "sdxl", "sd3", "flux"])
def test_other_denoisers_train_and_diffusers_loads_the_adapter(kind, data, tmp_path):
    """SD with v-prediction, min-SNR-γ, noise offset and the text encoder trained too; SDXL (pooled text +
    size/crop ids); SD3 and Flux (flow matching; Flux's packed latents): the adapter trains, and diffusers'
    loader gives lorakit's image."""
    from diffusers import DiffusionPipeline

    from tests.e2e.tiny_pipeline import build_other_pipeline

    extra = {}
    if kind == "sd-v-te":
        base = build_pipeline(tmp_path / kind, prediction_type="v_prediction")
        extra = {"train_text_encoder": True, "snr_gamma": 5.0, "noise_offset": 0.05}
    else:
        base = build_other_pipeline(kind, tmp_path / kind)
    out = tmp_path / "lora"
    train(load_config(None, {**FLAGS, "model": str(base), "data": str(data), "output": str(out), "max_steps": 2,
                             "save_every": 0, **extra}))
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    denoiser = "transformer" if kind in ("sd3", "flux") else "unet"
    components = {denoiser, "text_encoder"} if extra else {denoiser}
    assert keys and {k.split(".")[0] for k in keys} == components and all(".lora_" in k for k in keys)
    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    scale = {"joint_attention_kwargs" if denoiser == "transformer" else "cross_attention_kwargs": {"scale": 1.0}}
    theirs = _pixels(pipe(PROMPT, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                          generator=torch.Generator().manual_seed(SEED), **scale).images[0])
    image = tmp_path / "ours.png"
    assert main(["generate-image", "--model", str(base), "--adapter", str(out), "--prompt", PROMPT, "--seed",
                 str(SEED), "--steps", "2", "--height", str(RESOLUTION), "--width", str(RESOLUTION),
                 "--out", str(image)]) == 0
    assert np.abs(_pixels(Image.open(image)) - theirs).max() <= 1
