"""`torchrun … -m lorakit train` on CPU with gloo: the real launcher, two processes, a tiny Llama.

What one process would compute is the reference: two ranks with per-rank batch 2 must end where one process
with batch 4 ends (dropout 0 there: each rank draws its own dropout masks, so with dropout the runs are
equally good but not equal); FSDP must end where DDP ends; a killed rank must stop the job within a minute
and a resume (by torchrun's restart, or by hand) must reach the uninterrupted result, dropout included (each
rank's RNG comes back from the checkpoint). Few launches: each costs a few seconds of start-up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.test_train import ADAPTER_FILES, build_tiny_model, records

STEPS = 16


def write_varied(path: Path, n: int = 25) -> Path:
    """Answers of 1 to 10 words: a step's loss is a mean over label tokens only if every rank divides by the
    step's global token count. 25 examples in micro-batches of 4: each epoch ends with a 1-example batch,
    so one rank has nothing to train on there and must still take part."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Question {i}: what is the answer?",
                                "output": " ".join(["forty two"] * (1 + 3 * (i % 4)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {"model": build_tiny_model(root / "model"), "train": write_varied(root / "train.jsonl"),
            "val": write_varied(root / "val.jsonl", 6), "root": root}


def args(job: dict[str, Path], output: Path, *extra: str | Path, batch: int = 2) -> list[str]:
    # --lora-r, not --r: torchrun would take --r for an abbreviation of its own --rdzv-*/--role options
    return [str(a) for a in ("train", "--model", job["model"], "--data", job["train"], "--val-data", job["val"],
                             "--eval-every", 8, "--output", output,
                             "--max-steps", STEPS, "--lr", "1e-2", "--batch-size", batch, "--grad-accum", 2,
                             "--seq-len", 64, "--save-every", 2, "--threads", 1, "--precision", "fp32",
                             "--lora-r", 4, *extra)]


def torchrun(*lorakit_args: str, launcher: tuple[str, ...] = ("--nproc-per-node", "2"), popen: bool = False,
             cwd: Path | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "lorakit", *lorakit_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=cwd)


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in records(output) if "loss" in r]


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The live worker process of ``rank`` that torchrun started (children of its agent)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


def wait_for(path: Path, launcher: subprocess.Popen) -> None:
    while not path.is_dir():
        assert launcher.poll() is None, "the run ended before it could be killed:\n" + launcher.communicate()[0]
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ddp_run(job) -> Path:
    """Two ranks, DDP, dropout on: the uninterrupted reference for FSDP and for the resumed runs."""
    output = job["root"] / "ddp"
    r = torchrun(*args(job, output, "--dropout", "0.1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes (ddp over gloo); global batch 8 = 2 per rank × 2 ranks × 2 grad-accum" in r.stderr
    assert r.stderr.count("step: fused decoder layers") == 1  # rank 0 alone reports
    return output


def test_two_ranks_end_where_one_process_with_twice_the_batch_ends(job, tmp_path, capsys):
    from lorakit.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(job, one, "--dropout", "0", batch=4)) == 0
    r = torchrun(*args(job, two, "--dropout", "0"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert max_diff(one, two) <= 1e-5
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)  # the mean over the global step's label tokens
    # rank 0 alone wrote: the same files as one process, one record per step, one result line
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} == ADAPTER_FILES | {
        "config.yaml", "metrics.jsonl", "checkpoints"}
    assert [r["step"] for r in records(two) if "loss" in r] == list(range(1, STEPS + 1))
    evals = [r for r in records(two) if "eval_loss" in r]  # every rank evaluates the whole validation set
    assert [r["step"] for r in evals] == [8, 16]
    assert [r["eval_loss"] for r in evals] == pytest.approx([r["eval_loss"] for r in records(one) if "eval_loss" in r],
                                                            abs=1e-5)
    assert r.stdout.count("trained 16 steps") == 1
    state = json.loads((two / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (state["epoch"], state["batch_index"]) == (4, 4)  # 32 micro-batches of 7


def test_fsdp_ends_where_ddp_ends(job, ddp_run, tmp_path):
    output = tmp_path / "fsdp"
    r = torchrun(*args(job, output, "--dropout", "0.1", "--strategy", "fsdp"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(fsdp over gloo)" in r.stderr
    assert max_diff(ddp_run, output) <= 1e-4
    config = json.loads((output / "adapter_config.json").read_text())
    assert config == json.loads((ddp_run / "adapter_config.json").read_text()) and config["r"] == 4
    # checkpoints hold full tensors (gathered from the shards), as one process writes them
    step = load_file(output / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
    assert step.keys() == load_file(ddp_run / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors").keys()


def test_a_killed_rank_stops_the_job_and_resuming_reaches_the_uninterrupted_result(job, ddp_run, tmp_path):
    """Fresh run under --max-restarts 1 (no --resume): kill rank 1 -> torchrun restarts the workers and
    they continue from the checkpoint by themselves; kill rank 1 again -> no restart left: the job exits
    non-zero within a minute; `--resume` by hand completes it. Dropout on: each rank's RNG must come back."""
    output = tmp_path / "out"
    launcher = torchrun(*args(job, output, "--dropout", "0.1"), popen=True,
                        launcher=("--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1"))
    try:
        wait_for(output / "checkpoints" / "step-4", launcher)
        os.kill(worker(launcher, 1), signal.SIGKILL)
        wait_for(output / "checkpoints" / "step-10", launcher)  # the restarted workers' checkpoint
        os.kill(worker(launcher, 1), signal.SIGKILL)
        killed = time.monotonic()
        out, _ = launcher.communicate(timeout=90)
        stopped_after = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and stopped_after < 60
    assert "resuming from" in out and "lost the other ranks" in out
    assert not (output / "adapter_model.safetensors").exists()
    done = [int(p.name.split("-")[1]) for p in (output / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert 10 <= max(done) < STEPS

    r = torchrun(*args(job, output, "--dropout", "0.1", "--resume"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert max_diff(ddp_run, output) <= 1e-5
    assert losses(output) == losses(ddp_run)


def test_ranks_that_disagree_stop_at_start_with_one_line(job, tmp_path):
    """Two machines' worth of torchrun (--nnodes 2, a c10d rendezvous), each in its own folder whose
    data.jsonl differs: the same command line, different data. Nothing may be written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "disagree")
    output = tmp_path / "out"
    nodes = []
    for name, n in (("a", 25), ("b", 24)):
        (tmp_path / name).mkdir()
        write_varied(tmp_path / name / "data.jsonl", n)
        cmd = args(job, output)
        cmd[cmd.index(str(job["train"]))] = "data.jsonl"
        nodes.append(torchrun(*cmd, launcher=launcher, popen=True, cwd=tmp_path / name))
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    lines = [line for out in outs for line in out.splitlines() if line.startswith("lorakit: error")]
    assert len(lines) == 1, outs
    assert lines[0].startswith("lorakit: error: ranks disagree on --data data.jsonl sha256: rank 0 has")
    assert not output.exists()
