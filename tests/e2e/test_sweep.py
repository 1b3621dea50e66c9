"""`lorakit sweep` and `lorakit lr-find` end to end: real Optuna (journal file, PostgreSQL when
LORAKIT_TEST_POSTGRES_URL names a server: .ci/run starts one), on the tiny Llama of test_train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_train import build_tiny_model, in_process, records, write_task

POSTGRES = os.environ.get("LORAKIT_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep-task")
    return {"model": build_tiny_model(root / "model"), "train": write_task(root / "train.jsonl", 24)}


def sweep_args(task: dict[str, Path], output: Path, *extra: str | Path) -> list[str | Path]:
    # no --val-data: the sweep holds out 10% of the data; an eval every step feeds the pruner
    return ["sweep", "--model", task["model"], "--data", task["train"], "--output", output, "--max-steps", "6",
            "--batch-size", "4", "--seq-len", "64", "--threads", "1", "--precision", "fp32", *extra]


def study_trials(output: Path) -> list[dict]:
    return json.loads((output / "summary.json").read_text())["trials"]


def test_six_trials_pruned_and_best_config_trains(task, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAKIT_TRACK", "1")  # MLflow on (the suite turns it off), into a store of this test
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    output = tmp_path / "sweep"
    code, err = in_process(capsys, *sweep_args(task, output, "--trials", "6"))
    assert code == 0, err
    assert "holding out 10%" in err
    trials = study_trials(output)
    assert [t["number"] for t in trials] == list(range(6))
    assert {t["state"] for t in trials} <= {"complete", "pruned"}
    assert any(t["state"] == "pruned" for t in trials)
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert all(t["steps"] < 6 for t in pruned)  # stopped at once, not at the end
    assert len({t["options"]["lr"] for t in trials}) == 6
    assert all(t["options"]["alpha"] / t["options"]["r"] in (1, 2) for t in trials)
    assert all(1e-5 <= t["options"]["lr"] <= 1e-2 and 0 <= t["options"]["dropout"] <= 0.1 for t in trials)
    assert (output / "lr_vs_objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["importance"] and set(summary["importance"]) == {"lr", "r", "alpha_per_r", "dropout"}
    best = summary["best"]
    complete = [t for t in trials if t["state"] == "complete"]
    assert best["value"] == min(t["value"] for t in complete)

    # one MLflow run for the sweep, the six trials' runs nested under it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    parents = client.search_runs(client.get_experiment_by_name("lorakit").experiment_id,
                                 "tags.`lorakit.sweep.study` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([parents[0].info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"trial-{i:04d}" for i in range(6)]
    assert parents[0].data.metrics["best_eval_loss"] == pytest.approx(best["value"])
    monkeypatch.setenv("LORAKIT_TRACK", "0")

    # the best config trains unchanged, and computes the best trial's eval loss again (the lowest of its evals:
    # --keep-best publishes that one, and it is the trial's value)
    code, err = in_process(capsys, "train", output / "best.yaml")
    assert code == 0, err
    saved = yaml.safe_load((output / "best.yaml").read_text())
    assert saved["train"]["lr"] == best["options"]["lr"] and saved["lora"]["r"] == best["options"]["r"]
    evals = [r["eval_loss"] for r in records(output / "best") if "eval_loss" in r]
    assert saved["train"]["keep_best"] and min(evals) == pytest.approx(best["value"], rel=1e-5)

    # the study is the state: the same command adds nothing, --trials 7 exactly one trial
    code, err = in_process(capsys, *sweep_args(task, output, "--trials", "6"))
    assert code == 0 and "sweep: trial" not in err
    code, err = in_process(capsys, *sweep_args(task, output, "--trials", "7"))
    assert code == 0 and err.count("sweep: trial") == 1
    assert [t["number"] for t in study_trials(output)] == list(range(7))


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_one_study(task, tmp_path, backend):
    if backend == "postgresql" and not POSTGRES:
        pytest.skip("LORAKIT_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    output = tmp_path / "sweep"
    extra = ["--storage", POSTGRES, "--study-name", f"test-{uuid.uuid4().hex[:8]}"] if backend == "postgresql" else []
    cmd = [sys.executable, "-m", "lorakit", *map(str, sweep_args(task, output, "--trials", "4", "--max-steps", "2",
                                                                  *extra))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err
    ran = [int(line.split()[2].rstrip(":")) for _, err in outs for line in err.splitlines()
           if line.startswith("sweep: trial ")]
    assert sorted(ran) == list(range(4))  # each trial run once, by one worker
    import optuna

    if backend == "postgresql":
        study = optuna.load_study(study_name=extra[-1], storage=POSTGRES)
    else:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        study = optuna.load_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(str(output / "study.journal"))))
    # a worker that asked for a trial just as the other took the last one gives it up: FAIL, marked surplus
    trials = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert all(t.state.name == "FAIL" and not t.user_attrs.get("options") for t in study.trials if t not in trials)
    states = [t.state.name for t in trials]
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"}
    assert len({t.params["lr"] for t in trials}) == 4
    assert sorted(p.name for p in output.glob("trial-*")) == [f"trial-{i:04d}" for i in range(4)]


def test_lr_find_suggests_inside_the_ramp(task, tmp_path, capsys):
    from lorakit.cli import main

    output = tmp_path / "lr"
    capsys.readouterr()
    code = main([str(a) for a in ("lr-find", "--model", task["model"], "--data", task["train"], "--output", output,
                                  "--steps", "40", "--batch-size", "4", "--seq-len", "64", "--threads", "1",
                                  "--precision", "fp32")])
    out = capsys.readouterr().out
    assert code == 0
    found = json.loads((output / "lr_find.json").read_text())
    assert found["lrs"][0] == pytest.approx(1e-7) and len(found["lrs"]) <= 40
    assert found["lrs"][0] < found["suggestion"] < found["lrs"][-1]
    assert f"suggested lr {found['suggestion']:.2g}" in out and "prior" in out
    assert {p.name for p in output.iterdir()} == {"lr_find.png", "lr_find.json"}  # no weights
    assert (output / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["storage", "driver", "objective", "space", "space_key", "folder"])
def test_bad_input_is_one_line_and_writes_nothing(task, tmp_path, capsys, case):
    output = tmp_path / "sweep"
    extra: list[str | Path] = []
    if case == "storage":  # nothing listens on port 1
        extra = ["--storage", "postgresql://lorakit:secret@127.0.0.1:1/none"]
        expect = "--storage postgresql://lorakit:***@127.0.0.1:1/none: cannot open it"
    elif case == "driver":
        extra = ["--storage", "nosuchdb://host/db"]
        expect = "--storage nosuchdb://host/db: cannot open it"
    elif case == "objective":
        extra = ["--objective", "eval_accuracyy"]
        expect = "--objective 'eval_accuracyy': not an eval metric"
    elif case in ("space", "space_key"):
        config = tmp_path / "sweep.yaml"
        space = "  lr: {low: 1.0e-2, high: 1.0e-5, log: true}" if case == "space" else "  lrr: [1.0e-3]"
        config.write_text(f"train:\n  seed: 1\nsweep:\n  r: [4, 8]\n{space}\n")
        extra = [config]
        expect = (f"{config}:5: sweep.lr: low 0.01 > high 1e-05; swap them" if case == "space"
                  else f"{config}:5: sweep.lrr: not an option a sweep can vary (did you mean lr?)")
    else:  # an output folder that is not a sweep's
        output.mkdir()
        (output / "notes.txt").write_text("mine")
        expect = "not a sweep's folder"
    code, err = in_process(capsys, *sweep_args(task, output, "--trials", "2", *extra))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    assert "secret" not in err
    if case == "folder":
        assert [p.name for p in output.iterdir()] == ["notes.txt"]
    else:
        assert not output.exists()


def test_interrupted_sweep_resumes_its_trial_from_the_checkpoint(task, tmp_path, capsys):
    import signal
    import time

    output = tmp_path / "sweep"
    # no --save-every: Ctrl-C writes a checkpoint at the step it stops
    args = sweep_args(task, output, "--trials", "2", "--max-steps", "100", "--eval-every", "50")
    worker = subprocess.Popen([sys.executable, "-m", "lorakit", *map(str, args)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    metrics = output / "trial-0001" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text()) and time.monotonic() < deadline:  # trial 1 is training
        assert worker.poll() is None, worker.stderr.read()
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    err = worker.communicate(timeout=120)[1]
    assert worker.returncode == 130, err
    assert "sweep interrupted with 1 of 2 trials finished" in err and "Traceback" not in err

    code, err = in_process(capsys, *args)  # the same command: trial 1 continues as trial 2, from its checkpoint
    assert code == 0, err
    assert f"resuming from {output / 'trial-0001' / 'checkpoints'}" in err
    trials = study_trials(output)
    assert [(t["number"], t["state"]) for t in trials] == [(0, "complete"), (1, "fail"), (2, "complete")]
    assert trials[2]["note"] == "resumed trial-0001" and trials[2]["options"] == trials[1]["options"]
    assert not (output / "trial-0002").exists()
    assert [r["step"] for r in records(output / "trial-0001") if "loss" in r] == list(range(1, 101))
