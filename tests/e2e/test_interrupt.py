"""Stopping `lorakit train` with a real signal: the step finishes, a complete checkpoint is written, the
message says how to resume, and the printed command resumes (issue 8, item 1)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_train import CHECKPOINT_FILES, build_tiny_model, in_process, records, write_task

STEPS = 100_000  # never reached: the run is stopped by a signal


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"model": build_tiny_model(root / "model"), "train": write_task(root / "train.jsonl", 16)}


def run_args(task: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--model", str(task["model"]), "--data", str(task["train"]),
            "--output", str(output), "--max-steps", str(STEPS), "--batch-size", "4", "--seq-len", "64",
            "--lr", "1e-3", "--threads", "1", *extra]


def logged_steps(output: Path) -> int:
    path = output / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_steps(proc: subprocess.Popen, output: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while logged_steps(output) < n:
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.monotonic() < deadline, "no training step in 120 s"
        time.sleep(0.05)


def assert_checkpoint_at(output: Path, step: int) -> None:
    folder = output / "checkpoints" / f"step-{step}"
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == step
    assert [r["step"] for r in records(output)] == list(range(1, step + 1))  # the log matches the checkpoint
    assert not (output / "adapter_model.safetensors").exists()  # an unfinished run publishes nothing


def test_sigterm_then_sigint_stop_after_the_step_with_a_checkpoint_and_resume(task, tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    # SIGTERM (a scheduler, kill): stderr is a pipe, so progress is plain lines
    proc = subprocess.Popen(run_args(task, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_steps(proc, output, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    message = err.strip().splitlines()[-1]
    step = int(message.split(" at step ")[1].split()[0])
    assert message == (f"lorakit: interrupted (SIGTERM) at step {step} of {STEPS}: checkpoint written to "
                       f"{output / 'checkpoints' / f'step-{step}'}; continue with: lorakit train --output {output} "
                       "--resume")
    assert_checkpoint_at(output, step)

    # the printed command, on a terminal (stderr a pty: the live progress bar), stopped by Ctrl-C (SIGINT)
    leader, follower = pty.openpty()
    resumed = [sys.executable, "-m", "lorakit", "train", "--output", str(output), "--resume"]
    proc = subprocess.Popen(resumed, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:  # keep reading, or the child blocks on a full terminal buffer
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child has exited and closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for_steps(proc, output, step + 2)
        time.sleep(0.3)  # let the bar redraw at least once (rich refreshes 10 times a second)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        reader.join(timeout=30)
        os.close(leader)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 130, screen
    assert f"resuming from {output / 'checkpoints' / f'step-{step}'} (step {step} of {STEPS})" in screen
    at = screen.index("lorakit: interrupted (SIGINT) at step ")
    stopped = int(screen[at:].split(" at step ")[1].split()[0])
    assert stopped >= step + 2
    assert f"/{STEPS}" in screen[:at]  # the bar was drawn ("step N/100000") ...
    assert f"/{STEPS}" not in screen[at:]  # ... and not again after the message
    assert_checkpoint_at(output, stopped)


def test_resume_without_a_checkpoint_says_it_starts_over(task, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["train", "--model", task["model"], "--data", task["train"], "--output", output, "--batch-size", "4",
            "--seq-len", "64", "--lr", "1e-3", "--threads", "1"]
    code, err = in_process(capsys, *args, "--max-steps", "1", "--resume")
    assert code == 0, err
    assert f"--resume: nothing to resume in {output}; starting a new run" in err
    code, err = in_process(capsys, *args, "--max-steps", "2", "--resume")  # finished, but no checkpoint kept
    assert code == 0, err
    assert f"--resume: no checkpoint in {output}; starting over from step 1" in err
    assert [r["step"] for r in records(output)] == [1, 2]
