"""MLflow tracking of `lorakit train` (issue 9, item 1) on a tiny Llama: real MLflow stores (SQLite under tmp)
and a real `mlflow server`. The suite runs with LORAKIT_TRACK=0 (tests/conftest.py); these tests turn it on."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import sigkill_once
from tests.e2e.test_train import ADAPTER_FILES, build_tiny_model, in_process, records, write_task

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch")
EVAL_KEYS = ("eval_loss", "eval_ppl")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"model": build_tiny_model(root / "model"), "train": write_task(root / "train.jsonl", 24),
            "val": write_task(root / "val.jsonl", 6, start=100)}


def train_flags(task: dict[str, Path], output: Path, **extra) -> dict[str, str]:
    flags = {"model": task["model"], "data": task["train"], "val_data": task["val"], "output": output,
             "max_steps": 8, "lr": 1e-2, "batch_size": 4, "seq_len": 64, "save_every": 2, "eval_every": 4,
             "threads": 1, **extra}
    return {k: str(v) for k, v in flags.items()}


def train_args(task: dict[str, Path], output: Path, **extra) -> list[str]:
    return ["train"] + [a for k, v in train_flags(task, output, **extra).items() for a in ("--" + k.replace("_", "-"), v)]


@pytest.fixture(scope="module", autouse=True)
def nothing_left_in_the_working_directory():
    before = {p for p in ("mlflow.db", "mlruns") if Path(p).exists()}
    yield
    assert {p for p in ("mlflow.db", "mlruns") if Path(p).exists()} == before


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"  # one store: its tables made once


@pytest.fixture
def store(monkeypatch, store_uri) -> str:
    """Tracking on, into a SQLite store under tmp (artifacts in mlruns/ beside it)."""
    uri = store_uri
    monkeypatch.setenv("LORAKIT_TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def the_run(output: Path):
    """(client, run) of the run OUTPUT/mlflow_run.json names."""
    from mlflow import MlflowClient

    saved = json.loads((output / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_recorded(client, run, output: Path, data: Path) -> None:
    """The run holds the whole config as params, every metrics.jsonl step once, its tags and artifacts."""
    from lorakit.config import load_config
    from lorakit.track.mlflow import flatten_config

    recs = records(output)
    assert run.info.status == "FINISHED"
    params = flatten_config(load_config(output / "config.yaml"))
    for tag, change in run.data.tags.items():  # a param a resumed run changed keeps its first value (immutable)
        if tag.startswith("lorakit.resumed."):
            params[tag.removeprefix("lorakit.resumed.")] = change.split(" -> ")[0]
    assert run.data.params == params
    for key in TRAIN_KEYS + EVAL_KEYS:
        logged = [(r["step"], r[key]) for r in recs if key in r]
        got = history(client, run.info.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in logged], key  # each step once, none missing
        if key != "tokens_per_s":  # a resumed run recomputes the steps after its checkpoint, at its own speed
            assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6), key
    tags = run.data.tags
    import torch
    import transformers

    cfg = load_config(output / "config.yaml")
    assert tags["torch.version"] == torch.__version__ and tags["transformers.version"] == transformers.__version__
    assert tags["lorakit.data.train.sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (tags["lorakit.seed"], tags["lorakit.device"], tags["lorakit.precision"]) == ("0", "cpu",
                                                                                         cfg.train.precision)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"adapter", "loss_curve.png"}
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter == ADAPTER_FILES | {"config.yaml", "metrics.jsonl"}
    png = Path(client.download_artifacts(run.info.run_id, "loss_curve.png", str(output.parent)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_store_records_the_run_and_resume_after_sigkill_continues_it(task, tmp_path, monkeypatch, capsys):
    """No MLFLOW_TRACKING_URI: MLflow's default sqlite:///mlflow.db in the working directory. A run killed
    after a checkpoint (SIGKILL: nothing flushed since the last batch) and resumed, from another directory, is
    one MLflow run."""
    monkeypatch.setenv("LORAKIT_TRACK", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    output = tmp_path / "out"
    sigkill_once([sys.executable, "-m", "lorakit", *train_args(task, output, max_steps=24)],
                 output / "checkpoints" / "step-2", timeout=180, cwd=tmp_path)
    first = json.loads((output / "mlflow_run.json").read_text())
    assert first["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert {"mlflow.db"} <= {p.name for p in tmp_path.iterdir()}

    code, err = in_process(capsys, "train", "--output", output, "--resume")  # here: the working dir is elsewhere
    assert code == 0, err
    assert "resuming from" in err and f"tracking: MLflow run {first['run_id']} " in err
    assert json.loads((output / "mlflow_run.json").read_text()) == first
    assert (tmp_path / "mlruns").is_dir()  # the artifacts, beside mlflow.db
    client, run = the_run(output)
    assert [x.info.run_id for x in client.search_runs([first["experiment_id"]])] == [first["run_id"]]
    assert run.info.run_name == "out" and max(r["step"] for r in records(output)) == 24
    assert_recorded(client, run, output, task["train"])


def test_interrupted_run_is_killed_then_resumed_as_the_same_run(task, tmp_path, store, capsys):
    """SIGTERM: the run ends KILLED with what it logged; --resume continues it (FINISHED); --experiment,
    --run-name; the commit of the git repository the run started in."""
    from lorakit.errors import Interrupted
    from lorakit.train.callbacks import Callback
    from lorakit.train.loop import run_config, train

    class SigtermAt(Callback):
        def on_log(self, record):
            if record["step"] == 3 and "loss" in record:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step, with a checkpoint

    output = tmp_path / "out"
    cfg = run_config(None, train_flags(task, output, experiment="exp-a", run_name="first"))
    with pytest.raises(Interrupted):
        train(cfg, callbacks=[SigtermAt()])
    client, run = the_run(output)
    assert run.info.status == "KILLED" and run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).name == "exp-a"
    assert [s for s, _ in history(client, run.info.run_id, "loss")] == [1, 2, 3]
    assert "interrupted (SIGTERM) at step 3" in run.data.tags["lorakit.error"]

    code, err = in_process(capsys, "train", "--output", output, "--resume", "--max-steps", "6")
    assert code == 0, err
    client, resumed = the_run(output)
    assert resumed.info.run_id == run.info.run_id
    assert_recorded(client, resumed, output, task["train"])
    assert resumed.data.tags["lorakit.resumed.train.max_steps"] == "8 -> 6"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert resumed.data.tags.get("mlflow.source.git.commit") == (head.stdout.strip() if head.returncode == 0
                                                                 else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A real `mlflow server` on a free localhost port (its own process group: stopped with its workers)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                             str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server not up in 240 s"
            time.sleep(0.2)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    yield url, stop
    stop()


def warnings_in(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_tracking_server_records_runs_and_a_lost_server_is_one_warning(task, tmp_path, server, monkeypatch, capsys):
    from mlflow import MlflowClient

    from lorakit.train.callbacks import Callback
    from lorakit.train.loop import run_config, train

    url, stop = server
    monkeypatch.setenv("LORAKIT_TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    code, err = in_process(capsys, *train_args(task, tmp_path / "a"))
    assert code == 0, err
    assert not warnings_in(err)
    client, run = the_run(tmp_path / "a")
    assert isinstance(client, MlflowClient) and client.tracking_uri == url
    assert f"tracking: MLflow run {url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in err
    assert_recorded(client, run, tmp_path / "a", task["train"])

    class ServerDiesAt(Callback):  # after MLflow's hook saw the record: the server goes away mid-run
        def on_log(self, record):
            if record["step"] == 2:
                stop()

    cfg = run_config(None, train_flags(task, tmp_path / "b", save_every=0))
    capsys.readouterr()
    result = train(cfg, callbacks=[ServerDiesAt()])
    lines = warnings_in(capsys.readouterr().err)
    assert result.steps == 8 and len(lines) == 1, lines
    assert lines[0].startswith("warning: MLflow tracking stopped at ")
    assert lines[0].endswith(f" recorded in {tmp_path / 'b' / 'metrics.jsonl'}")
    assert [r["step"] for r in records(tmp_path / "b") if "loss" in r] == list(range(1, 9))

    # the server is gone before the start: one line, the run trains untracked, exit 0
    code, err = in_process(capsys, *train_args(task, tmp_path / "c"))
    assert code == 0, err
    assert warnings_in(err) == [f"warning: not tracked in MLflow: {url} cannot be reached (Connection refused); "
                                f"the run goes on, recorded in {tmp_path / 'c' / 'metrics.jsonl'}"]
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "c" / "mlflow_run.json").exists()


@pytest.mark.parametrize("uri, reason", [("http://127.0.0.1:1", "http://127.0.0.1:1 cannot be reached"),
                                         ("nosuchscheme://x", "nosuchscheme")])
def test_a_store_that_cannot_be_used_is_one_line(task, tmp_path, monkeypatch, capsys, uri, reason):
    monkeypatch.setenv("LORAKIT_TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err = in_process(capsys, *train_args(task, tmp_path / "out", max_steps=2))
    assert code == 0, err
    lines = warnings_in(err)
    assert len(lines) == 1 and lines[0].startswith("warning: not tracked in MLflow: ") and reason in lines[0]


def test_track_switches(task, store, monkeypatch, tmp_path):
    """--no-track (track.enabled: false) and LORAKIT_TRACK=0 leave MLflow out of the run; a resumed run may
    change the tracking settings."""
    from lorakit.config import save_config
    from lorakit.train.loop import _check_same_run, default_callbacks, run_config

    cfg = run_config(None, {"data": str(task["train"])})
    assert [type(h).__name__ for h in default_callbacks(cfg)] == ["MLflowCallback"]
    untracked = run_config(None, {"data": str(task["train"]), "track": "false", "experiment": "other"})
    assert default_callbacks(untracked) == []
    save_config(cfg, tmp_path / "config.yaml")
    _check_same_run(tmp_path / "config.yaml", untracked)
    monkeypatch.setenv("LORAKIT_TRACK", "0")
    assert default_callbacks(cfg) == []


def test_any_numeric_metric_an_event_and_a_parent_run(task, tmp_path, store):
    """What other parts of a run send through the loop's records: any numeric metric (eval_exact_match), an
    event ({"event": "overfitting", "message": ...}) as the tag lorakit.overfitting; and a sweep's trial
    (track.parent_run_id) nested under its parent run, in the parent's experiment."""
    from mlflow import MlflowClient

    from lorakit.config import save_config
    from lorakit.track.mlflow import MLflowCallback, experiment_id
    from lorakit.train.callbacks import TrainResult
    from lorakit.train.loop import run_config

    client = MlflowClient(store)
    parent = client.create_run(experiment_id(client, "a-sweep", store), run_name="sweep")
    output = tmp_path / "trial"
    output.mkdir()
    cfg = run_config(None, train_flags(task, output, parent_run_id=parent.info.run_id, experiment="ignored"))
    save_config(cfg, output / "config.yaml")
    (output / "metrics.jsonl").write_text("")
    hook = MLflowCallback()
    hook.on_start(cfg, output, {"step": 0})
    sent = [{"step": 4, "loss": 2.0, "lr": 1e-3}, {"step": 4, "eval_loss": 2.5, "eval_exact_match": 0.25,
                                                    "eval_f1": 0.5, "eval_note": "text is not a metric"},
            {"step": 8, "event": "overfitting", "message": "step 8: validation loss rose twice", "gap": 0.3}]
    with open(output / "metrics.jsonl", "a") as f:
        for record in sent:
            f.write(json.dumps(record) + "\n")
            hook.on_log(record)
    hook.on_end(TrainResult(output=output, steps=8, loss=2.0, eval_loss=2.5, stopped="pruned"))

    run = client.get_run(json.loads((output / "mlflow_run.json").read_text())["run_id"])
    assert run.info.experiment_id == parent.info.experiment_id and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics == {"loss": 2.0, "lr": 1e-3, "eval_loss": 2.5, "eval_exact_match": 0.25,
                                "eval_f1": 0.5, "gap": 0.3}
    assert history(client, run.info.run_id, "eval_exact_match") == [(4, 0.25)]
    assert run.data.tags["lorakit.overfitting"] == "step 8: validation loss rose twice"
    assert run.data.tags["lorakit.stopped"] == "pruned"
