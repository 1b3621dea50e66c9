"""`lorakit train` end to end: the real CLI in a subprocess on a tiny Llama with a tiny BPE tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import sigkill_once, tiny_llama

ANSWER = "The answer is forty two."
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
CHECKPOINT_FILES = ADAPTER_FILES | {"trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                                    "rng.safetensors", "trainer_state.json", "metrics.jsonl", "config.yaml"}


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama (hidden 32) and a 320-token byte-level BPE tokenizer that prepends <s>, saved as a
    Hugging Face folder (what --model expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"### Instruction:\nQuestion {i}: what is the answer?\n\n### Response:\n{ANSWER}" for i in range(20)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus + ["hello world, the quick brown fox"], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    model = tiny_llama(vocab=len(fast))
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = 0, 1
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


def write_task(path: Path, n: int, start: int = 0) -> Path:
    """A fixed-answer alpaca task: the model only has to learn one reply."""
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"instruction": f"Question {i}: what is the answer?", "output": ANSWER}) + "\n")
    return path


def lorakit(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, **kw)


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"model": build_tiny_model(root / "model"), "train": write_task(root / "train.jsonl", 24),
            "val": write_task(root / "val.jsonl", 6, start=100)}


def train_args(task: dict[str, Path], output: Path, *extra: str | Path) -> list[str | Path]:
    # dropout on, two micro-batches per step, a checkpoint every 2 steps: what exact resume must survive
    return ["train", "--model", task["model"], "--data", task["train"], "--val-data", task["val"],
            "--output", output, "--max-steps", "12", "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "2",
            "--dropout", "0.1", "--seq-len", "64", "--save-every", "2", "--eval-every", "4", "--threads", "1",
            *extra]


@pytest.fixture(scope="module")
def run(task, tmp_path_factory) -> Path:
    """One uninterrupted LoRA run, shared by the tests that inspect its output."""
    output = tmp_path_factory.mktemp("run") / "out"
    r = lorakit(*train_args(task, output))
    assert r.returncode == 0, r.stderr
    return output


def test_loss_falls_and_metrics_are_logged(run):
    recs = records(run)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(set(r) >= {"step", "loss", "lr", "tokens_per_s", "epoch"} for r in train)
    assert train[-1]["loss"] < 0.95 * train[0]["loss"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(set(r) >= {"eval_loss", "eval_ppl", "eval_accuracy"} for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_ppl"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-6)
    # cosine decay from the peak lr, no warmup
    assert train[0]["lr"] == pytest.approx(1e-2) and train[-1]["lr"] < train[5]["lr"] < train[0]["lr"]


def test_output_folder_holds_exactly_the_run(run, task):
    from lorakit.config import load_config

    assert {p.name for p in run.iterdir()} == ADAPTER_FILES | {"config.yaml", "metrics.jsonl", "checkpoints"}
    # keep_last 2 of the checkpoints written at steps 2, 4, ... 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-12"]
    # with validation data, keep-best (the default): each checkpoint also holds the best result so far
    assert {p.name for p in (run / "checkpoints" / "step-12").iterdir()} == CHECKPOINT_FILES | {"best"}
    state = json.loads((run / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    # 24 micro-batches at 6 per epoch: the stream stands at the end of epoch 3 (0-based)
    assert state["step"] == 12 and (state["epoch"], state["batch_index"]) == (3, 6)
    cfg = load_config(run / "config.yaml")
    assert cfg.train.lr == 1e-2 and cfg.lora.dropout == 0.1 and cfg.model.name_or_path == str(task["model"].resolve())
    final = load_file(run / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "step-12" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_peft_loads_the_adapter_with_the_same_logits(run, task):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit import load_adapter

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    base = AutoModelForCausalLM.from_pretrained(task["model"]).eval()
    with torch.no_grad():
        plain = base(ids).logits
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task["model"]), run).eval()
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(task["model"]), run).eval()
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - plain).abs().max().item() > 1e-3  # the trained adapter does change the model


def test_resume_after_sigkill_reproduces_the_uninterrupted_adapter(run, task, tmp_path):
    output = tmp_path / "out"
    sigkill_once([sys.executable, "-m", "lorakit", *train_args(task, output)], output / "checkpoints" / "step-2",
                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not (output / "adapter_model.safetensors").exists()

    r = lorakit(*train_args(task, output, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    expected, got = load_file(run / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-5
    assert [r.get("loss") for r in records(output)] == [r.get("loss") for r in records(run)]
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_rows_split_across_cores_train_as_one_batch_and_resume_exactly(run, task, tmp_path):
    """--threads 2 without dropout: each micro-batch's rows run as slices side by side (train/cores.py;
    the examples are long enough to be worth it, prompts of varied length). The adapter and the logged
    losses are the one-thread run's to fp32 rounding, and a run killed after a checkpoint and resumed
    repeats the uninterrupted split run bit for bit (the slices' gradients are added in a fixed order)."""
    data = tmp_path / "long.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            prompt = f"Question {i}: " + "hello world, the quick brown fox " * (8 + i % 5)
            f.write(json.dumps({"instruction": prompt, "output": ANSWER}) + "\n")
    long_task = {**task, "train": data}
    args = ["--dropout", "0", "--threads", "2", "--precision", "fp32", "--max-steps", "6", "--seq-len", "512"]
    split, one = tmp_path / "split", tmp_path / "one"
    r = lorakit(*train_args(long_task, split, *args))
    assert r.returncode == 0, r.stderr
    assert "rows split across cores" in r.stderr
    r = lorakit(*train_args(long_task, one, *args, "--threads", "1"))
    assert r.returncode == 0 and "rows not split" not in r.stderr, r.stderr
    a, b = load_file(split / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() / b[k].abs().max().item() for k in a) <= 1e-4
    assert any(b[k].abs().max().item() > 0 for k in b if "lora_B" in k)  # the adapters did train
    losses = [[x["loss"] for x in records(out) if "loss" in x] for out in (split, one)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)

    resumed = tmp_path / "resumed"
    sigkill_once([sys.executable, "-m", "lorakit", *train_args(long_task, resumed, *args)],
                 resumed / "checkpoints" / "step-2", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    r = lorakit(*train_args(long_task, resumed, *args, "--resume"))
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    got = load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(got[k], a[k]) for k in a)
    assert [x.get("loss") for x in records(resumed)] == [x.get("loss") for x in records(split)]


def in_process(capsys, *args: str | Path) -> tuple[int, str]:
    """``lorakit ARGS`` through the same ``main`` as the console script, in this process: for the runs that
    must stop before training, where a fresh interpreter would only add import time. (exit code, stderr)"""
    from lorakit.cli import main

    capsys.readouterr()
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def test_non_empty_output_is_refused(task, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite only replaces a lorakit run
        code, err = in_process(capsys, *train_args(task, output, *extra))
        assert code == 2
        assert err.startswith("lorakit: error: --output") and len(err.strip().splitlines()) == 1
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_non_finite_loss_stops_and_keeps_the_last_good_state(task, tmp_path, capsys):
    # lr 1e30: step 1 (computed on the initial weights) is finite, but it moves the adapter to ~1e30, so
    # step 2's activations overflow and its loss is nan
    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", task["train"], "--output", output,
                           "--max-steps", "6", "--lr", "1e30", "--batch-size", "4", "--save-every", "1", "--threads", "1")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("lorakit: error: step 2: loss nan is not finite")
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-1"]
    final = load_file(output / "adapter_model.safetensors")
    good = load_file(output / "checkpoints" / "step-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(final[k]).all() and torch.equal(final[k], good[k]) for k in final)
    assert [r["step"] for r in records(output)] == [1]


def test_bad_data_line_is_named_and_nothing_is_written(task, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(task["train"].read_text().splitlines()[0] + "\n" + '{"instruction": "x", "output": \n')
    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", data, "--output", output)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{data}:2:" in err
    assert not output.exists()


@pytest.mark.parametrize("flags,named", [
    (["--model", "/no/such/model"], "--model /no/such/model"),
    (["--lr", "fast"], "--lr"),
    (["--method", "half"], "--method"),
])
def test_bad_model_or_flag_is_one_line(task, tmp_path, capsys, flags, named):
    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", task["train"], "--output", output, *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err
    assert not output.exists()


def test_full_method_saves_a_loadable_model(task, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", task["train"], "--output", output,
                           "--method", "full", "--max-steps", "4", "--lr", "1e-3", "--batch-size", "4", "--threads", "1")
    assert code == 0, err
    names = {p.name for p in output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.jsonl"} <= names
    assert not names & ADAPTER_FILES
    recs = records(output)
    assert recs[-1]["loss"] < recs[0]["loss"]
    tuned = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(task["model"])
    diff = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters(), strict=True)]
    assert max(diff) > 0  # every weight trains, not an adapter


def test_early_stopping_on_a_flat_eval_loss(task, tmp_path, capsys):
    # lr 1e-30 (0 is refused): B moves from 0 to ~1e-30, far below the rounding of any activation, so the eval
    # loss never improves after the first eval and patience 2 stops at the third
    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", task["train"], "--val-data",
                           task["val"], "--output", output, "--max-steps", "10", "--lr", "1e-30", "--eval-every", "1",
                           "--patience", "2", "--batch-size", "4", "--threads", "1")
    assert code == 0, err
    assert [r["step"] for r in records(output) if "eval_loss" in r] == [1, 2, 3]
    assert (output / "adapter_model.safetensors").is_file()


def test_step_loss_is_the_mean_over_all_label_tokens_of_the_step(task, tmp_path, capsys):
    """With two micro-batches per step, the logged loss is sum(token losses) / (label tokens of the step),
    not the mean of the two micro-batch means (they differ when answers differ in length)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lorakit.config import DataConfig
    from lorakit.data import collate, length_grouped_batches, load_datasets
    from lorakit.data.tokenize import load_tokenizer

    data = tmp_path / "varied.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"instruction": f"Question {i}?", "output": " ".join(["forty two"] * (1 + 3 * (i % 4)))})
                    + "\n")
    output = tmp_path / "out"
    code, err = in_process(capsys, "train", "--model", task["model"], "--data", data, "--output", output,
                           "--max-steps", "1", "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "2", "--threads", "1",
                           "--precision", "fp32")  # fp32: the averaging is checked to 1e-4, below bf16's rounding
    assert code == 0, err
    logged = records(output)[0]["loss"]

    tok = load_tokenizer(str(task["model"]))
    examples, _ = load_datasets(DataConfig(train=str(data)), tok)
    model = AutoModelForCausalLM.from_pretrained(task["model"]).eval()  # B = 0 at step 1: the base's loss
    sums, counts = [], []
    for ids in length_grouped_batches(examples, 2, seed=0, epoch=0)[:2]:
        b = collate([examples[i] for i in ids], pad_id=0)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        sums.append(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), b["labels"][:, 1:], reduction="sum").item())
        counts.append(int((b["labels"][:, 1:] != -100).sum()))
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / 2
    assert abs(token_mean - mean_of_means) > 1e-3  # the data makes the two definitions disagree
    assert logged == pytest.approx(token_mean, abs=1e-4)


def test_callbacks_see_every_record_and_can_stop_the_run(task, tmp_path):
    """train(cfg, callbacks): hooks get each metrics.jsonl record in order; StopTraining ends the run at that
    step with the result published and ``stopped`` set to the hook's reason."""
    from lorakit.train.callbacks import Callback, StopTraining
    from lorakit.train.loop import run_config, train

    class Watch(Callback):
        def __init__(self):
            self.started, self.seen, self.ended = None, [], None

        def on_start(self, cfg, output, state):
            self.started = state["step"]

        def on_log(self, record):
            self.seen.append(record)
            if "eval_loss" in record and record["step"] == 4:
                raise StopTraining("pruned")

        def on_end(self, result):
            self.ended = result

    flags = dict(model=str(task["model"]), data=str(task["train"]), val_data=str(task["val"]),
                 output=str(tmp_path / "out"), max_steps=12, lr=1e-2, batch_size=4, seq_len=64, eval_every=4,
                 log_every=1, threads=1)
    watch = Watch()
    result = train(run_config(None, flags), callbacks=[watch])
    assert watch.started == 0 and result.stopped == "pruned" and result.steps == 4
    assert watch.ended is result
    assert watch.seen == records(tmp_path / "out")  # the same records, in the same order
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "out").iterdir()}
