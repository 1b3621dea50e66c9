"""Continuous evaluation in `lorakit train`: --eval-generate metrics at every eval, the overfitting warning, and
--keep-best publishing the best eval's adapter (also across a resume after SIGKILL).

The constructed case: the model is taught one answer while the validation records hold another text, so the
validation loss falls for a few steps (the shared format: end of answer) and then rises as the taught answer
takes the probability mass, while the training loss keeps falling. LoRA on the output head too, so the tiny
model learns within 16 steps; fp32, so the numbers do not depend on a timing probe.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.train.loop import TrainResult, train
from tests.conftest import sigkill_once
from tests.e2e.test_train import build_tiny_model, records, write_task

OTHER = "hello world, the quick brown fox"


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keep_best")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"instruction": f"Question {i}: what is the answer?", "output": OTHER}) + "\n"
                           for i in (100, 101)))
    return {"model": build_tiny_model(root / "model"), "train": write_task(root / "train.jsonl", 24), "val": val}


def flags(case: dict[str, Path], output: Path, **extra: str | bool) -> dict[str, str | bool]:
    return {"model": str(case["model"]), "data": str(case["train"]), "val_data": str(case["val"]),
            "output": str(output), "max_steps": "16", "lr": "5e-3", "batch_size": "4", "seq_len": "64",
            "target": "lm_head,q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "precision": "fp32",
            "eval_every": "2", "eval_generate": "2", "save_every": "2", "keep_last": "0", "threads": "1", **extra}


def cli_args(values: dict[str, str | bool]) -> list[str]:
    out = ["train"]
    for key, value in values.items():
        flag = key.replace("_", "-")
        out += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", value]
    return out


@pytest.fixture(scope="module")
def run(case, tmp_path_factory) -> tuple[Path, TrainResult, str]:
    """(output, result, stderr and stdout) of one uninterrupted run, in this process."""
    output = tmp_path_factory.mktemp("run") / "out"
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(err):
        result = train(load_config(None, flags(case, output)))
    return output, result, err.getvalue()


def evals(output: Path) -> list[dict]:
    return [r for r in records(output) if "eval_loss" in r]


def test_every_eval_logs_exact_match_and_f1(run):
    output, _, _ = run
    found = evals(output)
    assert [r["step"] for r in found] == list(range(2, 17, 2))
    for r in found:
        assert 0.0 <= r["eval_exact_match"] <= 1.0 and 0.0 <= r["eval_f1"] <= 1.0
    assert all(r["eval_exact_match"] == 0.0 for r in found)  # it never says OTHER, the validation answer


def test_overfitting_is_warned_once_with_step_and_gap(run):
    output, result, stderr = run
    found = evals(output)
    # the constructed case: eval loss falls, then rises; the train loss keeps falling
    losses = [r["eval_loss"] for r in found]
    best = losses.index(min(losses))
    assert 0 < best < len(losses) - 2 and losses[-1] > losses[best]
    events = [r for r in records(output) if r.get("event") == "overfitting"]
    assert len(events) == 1
    event = events[0]
    # the first eval that ends two rises in a row: the warning's step
    rises = [i for i in range(2, len(losses)) if losses[i - 2] < losses[i - 1] < losses[i]]
    assert event["step"] == found[rises[0]]["step"]
    train = [r["loss"] for r in records(output) if "loss" in r and event["step"] - 2 < r["step"] <= event["step"]]
    assert event["gap"] == pytest.approx(found[rises[0]]["eval_loss"] - sum(train) / len(train), rel=1e-9)
    warnings = [line for line in stderr.splitlines() if "overfitting" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"lorakit: warning: step {event['step']}: overfitting")
    assert f"gap eval_loss - train loss {event['gap']:.4f}" in warnings[0]


def test_the_published_adapter_is_the_best_steps(run):
    output, result, stderr = run
    found = evals(output)
    best = min(found, key=lambda r: r["eval_loss"])
    published = load_file(output / "adapter_model.safetensors")
    at_best = load_file(output / "checkpoints" / f"step-{best['step']}" / "adapter_model.safetensors")
    last = load_file(output / "checkpoints" / "step-16" / "adapter_model.safetensors")
    assert published.keys() == at_best.keys()
    assert all(torch.equal(published[k], at_best[k]) for k in published)
    assert not all(torch.equal(published[k], last[k]) for k in published)
    assert (result.best_step, result.best_eval_loss) == (best["step"], best["eval_loss"])
    assert result.eval_loss == found[-1]["eval_loss"] and result.stopped == "done"
    assert f"published the best eval (step {best['step']}, eval_loss {best['eval_loss']:.4f})" in stderr
    assert not (output / "best").exists()  # published; each checkpoint keeps its own best/
    assert json.loads((output / "checkpoints" / "step-16" / "best" / "best.json").read_text())["step"] == best["step"]


def test_keep_best_off_publishes_the_last_state(case, tmp_path):
    output = tmp_path / "last"
    result = train(load_config(None, flags(case, output, max_steps="8", eval_generate="0", keep_best=False)))
    found = evals(output)
    assert result.best_step == min(found, key=lambda r: r["eval_loss"])["step"]
    published = load_file(output / "adapter_model.safetensors")
    last = load_file(output / "checkpoints" / "step-8" / "adapter_model.safetensors")
    assert all(torch.equal(published[k], last[k]) for k in published)
    assert not (output / "checkpoints" / "step-8" / "best").exists()
    assert all("eval_f1" not in r for r in found)


def test_resume_after_sigkill_publishes_the_same_best_adapter(case, run, tmp_path):
    from lorakit.cli import main

    expected_output, _, _ = run
    best = min(evals(expected_output), key=lambda r: r["eval_loss"])["step"]
    output = tmp_path / "out"
    # killed once a checkpoint after the best step is written: its best/ must carry the best adapter
    sigkill_once([sys.executable, "-m", "lorakit", *cli_args(flags(case, output))],
                 output / "checkpoints" / f"step-{best + 2}", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not (output / "adapter_model.safetensors").exists()

    assert main(cli_args(flags(case, output, resume=True))) == 0
    expected, got = load_file(expected_output / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    def logged(output: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(output)]

    assert logged(output) == logged(expected_output)  # the same evals, and the one overfitting event


def test_a_non_finite_loss_publishes_the_best_evals_weights(case, tmp_path, capsys):
    from lorakit.cli import main

    # lr 1e30: step 1 is finite (evaluated: the best), step 2's loss is nan (see test_train)
    output = tmp_path / "out"
    assert main(cli_args(flags(case, output, lr="1e30", eval_every="1", eval_generate="0", save_every="1"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lorakit: error: step 2: loss nan is not finite; training stopped and the best eval's "
                          f"weights (step 1) are in {output}")
    published = load_file(output / "adapter_model.safetensors")
    best = load_file(output / "checkpoints" / "step-1" / "best" / "adapter_model.safetensors")
    assert all(torch.equal(published[k], best[k]) for k in published)
    assert not (output / "best").exists()


def test_eval_generate_on_text_records_is_one_line_and_nothing_written(case, tmp_path, capsys):
    from lorakit.cli import main

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(8)))
    output = tmp_path / "out"
    assert main(cli_args(flags(case, output, data=str(text), val_data=str(text)))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit: error: --eval-generate 2: the validation records are plain text, with no answer to "
                   "compare with; use alpaca, chat or prompt_completion data, or --eval-generate 0"]
    assert not output.exists()


def test_a_checkpoint_without_a_best_result_resumes_and_publishes_its_last_state(case, tmp_path):
    import shutil

    output = tmp_path / "out"
    train(load_config(None, flags(case, output, max_steps="8", eval_generate="0")))
    for p in (output / "checkpoints").iterdir():  # as a lorakit from before --keep-best left it: step-6 alone
        if p.name != "step-6":
            shutil.rmtree(p)
    shutil.rmtree(output / "checkpoints" / "step-6" / "best")
    # resumed to end at the checkpoint's step: no eval after it can make a new best
    result = train(load_config(None, flags(case, output, max_steps="6", eval_generate="0", resume=True)))
    assert result.steps == 6 and result.best_step is not None
    published = load_file(output / "adapter_model.safetensors")
    last = load_file(output / "checkpoints" / "step-6" / "adapter_model.safetensors")
    assert all(torch.equal(published[k], last[k]) for k in published)
