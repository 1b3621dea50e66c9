"""Every ``lorakit train`` run is an MLflow run: params (the resolved config, flattened ``section.name``), tags
(versions, git commit, data SHA-256, seed, device, precision), step metrics as they are logged, and at the end
the adapter folder and a loss-curve PNG as artifacts.

Where: ``MLFLOW_TRACKING_URI`` (a team's server, a database), else MLflow's own default, ``sqlite:///mlflow.db``
in the working directory, with artifacts in ``mlruns/`` beside that file. ``OUTPUT/mlflow_run.json`` names the
store, experiment and run, so ``--resume`` continues the same run; the history it lacks (metrics logged after
its last flush) is filled in from ``metrics.jsonl``.

Tracking never stops training: ``metrics.jsonl`` is the run's record and MLflow a copy. A store that cannot
be reached at start, or fails later, is one warning line on stderr and the run goes on untracked. Metrics are
sent in batches (one ``log_batch`` every few seconds), so a step does not wait on a database commit or an
HTTP round trip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.config import config_to_dict
from lorakit.fileio import sha256_file, write_atomic
from lorakit.train.callbacks import Callback

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lorakit.config import RunConfig
    from lorakit.train.callbacks import TrainResult

RUN_FILE = "mlflow_run.json"  # in the output folder: {"tracking_uri", "experiment_id", "run_id"}
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default store (MLflow >= 3.7), relative to the working dir
FLUSH_EVERY_S = 5.0
# MLflow retries a failed HTTP request up to 7 times with exponential backoff and waits 120 s for each answer:
# minutes of a stalled training step when a server goes away. lorakit's own calls allow a short wait instead
# (a user's own MLFLOW_HTTP_REQUEST_* settings win). MLflow's run links on stdout: lorakit prints its own.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
REACH_TIMEOUT_S = 3.0
# MLflow's limits: 100 params / 1000 metrics per log_batch, a param value of 6000 characters, a tag of 8000
MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS, MAX_TAG_CHARS = 100, 1000, 6000, 8000


def tracking_uri(saved: str = "") -> str:
    """``MLFLOW_TRACKING_URI``; else ``saved`` (the store a resumed run was recorded in); else MLflow's default
    ``sqlite:///mlflow.db`` made absolute, so a resume from another directory finds the same file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or saved
    if uri:
        return uri
    return "sqlite:///" + str(Path(DEFAULT_URI[len("sqlite:///"):]).resolve())


def unreachable(uri: str) -> str | None:
    """For an HTTP(S) tracking server: why it cannot be reached within a few seconds, or None (any HTTP
    answer, 401 or 404 included, counts as reached). Other stores are checked by the first call to them."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{uri} cannot be reached ({getattr(reason, 'strerror', None) or reason})"


@contextlib.contextmanager
def quiet_calls() -> Iterator[None]:
    """Around calls into MLflow: short HTTP waits (``HTTP_LIMITS``), and MLflow's, alembic's and urllib3's
    log lines and warnings kept off the training output (a failure is reported once, by the caller)."""
    env = {k: v for k, v in HTTP_LIMITS.items() if k not in os.environ}
    with contextlib.suppress(ImportError):  # first: importing mlflow sets its loggers' levels
        import mlflow  # noqa: F401
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic", "urllib3")]
    levels = [lg.level for lg in loggers]
    os.environ.update(env)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if new: for a local SQLite store with its artifacts in
    ``mlruns/`` beside the database file (MLflow's default would be the working directory's ``mlruns/``)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process (sweep workers start together)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """``{"train.lr": "0.0002", ...}``: every field of the resolved config as an MLflow param, as
    ``OUTPUT/config.yaml`` holds it (without ``--resume``/``--overwrite``: how a command was started)."""
    out = {}
    for section, fields in config_to_dict(cfg).items():
        for name, value in fields.items():
            if section == "train" and name in ("resume", "overwrite"):
                continue
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            out[f"{section}.{name}"] = text[:MAX_PARAM_CHARS]
    return out


def sha256_of(path: Path) -> str:
    """A file's SHA-256; for a folder (image data), the SHA-256 of its files' relative paths and digests."""
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_of(f)}\n".encode())
        return digest.hexdigest()
    return sha256_file(path)


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD's commit of the git repository holding ``cwd`` (the working directory), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: RunConfig, output: Path) -> dict[str, str]:
    """What a run needs to be reproduced beyond its params: versions, code, data, seed, hardware."""
    import torch
    import transformers

    import lorakit
    from lorakit.device import hardware_summary
    from lorakit.model import default_device

    tags = {"mlflow.source.name": "lorakit train", "mlflow.source.type": "LOCAL",
            "lorakit.version": lorakit.__version__, "torch.version": torch.__version__,
            "transformers.version": transformers.__version__, "lorakit.output": str(output.resolve()),
            "lorakit.seed": str(cfg.train.seed), "lorakit.device": str(default_device()),
            "lorakit.hardware": hardware_summary(), "lorakit.precision": cfg.train.precision}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for key, path in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if path and Path(path).exists():
            tags[f"lorakit.{key}.sha256"] = sha256_of(Path(path))
    return tags


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MLflowCallback(Callback):
    """Records a training run in MLflow (see the module docstring); one per run, on rank 0."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id = ""
        self.output = Path()
        self.pending: list[Any] = []  # mlflow.entities.Metric, sent by the next flush
        self.pending_tags: dict[str, str] = {}
        self.logged: dict[str, int] = {}  # metric -> the last step MLflow holds (a resumed run logs past it)
        self.last_flush = 0.0

    # --- the hooks: each one guarded, a failure is one warning and the end of tracking -------------------

    def on_start(self, cfg: RunConfig, output: Path, state: dict[str, Any]) -> None:
        self.output = output
        self._guarded("", lambda: self._start(cfg, output))

    def on_log(self, record: dict[str, Any]) -> None:
        if self.client is None:
            return
        self._queue(record)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self._guarded(f"step {record.get('step')}", self._flush)

    def on_end(self, result: TrainResult) -> None:
        if self.client is not None:
            self._guarded(f"the end of the run (step {result.steps})", lambda: self._end(result), ended=True)

    def on_error(self, error: BaseException) -> None:
        if self.client is None:
            return
        # an interruption (Ctrl-C, SIGTERM; --resume continues the run) is KILLED, anything else FAILED
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.pending_tags["lorakit.error"] = (str(error) or type(error).__name__)[:MAX_TAG_CHARS]
        self._guarded("the end of the run", lambda: (self._flush(), self._terminate(status)), ended=True)

    def _guarded(self, when: str, call: Any, ended: bool = False) -> None:
        """``call()``; on any failure one warning line (``when``: where the run was, "" at start) and no
        more tracking for this run."""
        try:
            with quiet_calls():
                call()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.client = None
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            what = f"MLflow tracking stopped at {when}" if when else "not tracked in MLflow"
            goes_on = "the run is" if ended else "the run goes on,"
            print(f"warning: {what}: {reason}; {goes_on} recorded in {self.output / 'metrics.jsonl'}",
                  file=sys.stderr, flush=True)

    # --- the work ----------------------------------------------------------------------------------------

    def _start(self, cfg: RunConfig, output: Path) -> None:
        saved = _read_run_file(output / RUN_FILE)
        uri = tracking_uri(saved.get("tracking_uri", ""))
        problem = unreachable(uri)
        if problem:
            raise RuntimeError(problem)
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RuntimeError("mlflow is not installed: pip install mlflow, or train with --no-track") from None
        client = MlflowClient(tracking_uri=uri)
        run = _existing_run(client, saved.get("run_id", "")) if saved.get("tracking_uri") == uri else None
        params = flatten_config(cfg)
        track = cfg.track
        if run is None:
            if track.parent_run_id:
                exp = client.get_run(track.parent_run_id).info.experiment_id
            else:
                exp = experiment_id(client, track.experiment, uri)
            tags = run_tags(cfg, output)
            if track.parent_run_id:
                tags["mlflow.parentRunId"] = track.parent_run_id
            run = client.create_run(exp, run_name=track.run_name or output.resolve().name, tags=tags)
            new_params = params
        else:  # resumed: the same run, running again; params it has keep their first value
            client.update_run(run.info.run_id, status="RUNNING")
            had = run.data.params
            new_params = {k: v for k, v in params.items() if k not in had}
            self.pending_tags.update({f"lorakit.resumed.{k}": f"{had[k]} -> {v}"[:MAX_TAG_CHARS]
                                      for k, v in params.items() if k in had and had[k] != v})
            for key in run.data.metrics:
                history = client.get_metric_history(run.info.run_id, key)
                self.logged[key] = max((m.step for m in history), default=-1)
        self.client, self.run_id = client, run.info.run_id
        write_atomic(output / RUN_FILE, lambda p: p.write_text(json.dumps(
            {"tracking_uri": uri, "experiment_id": run.info.experiment_id, "run_id": self.run_id}) + "\n"))
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in new_params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS], synchronous=True)
        # the history so far (a resumed run's metrics.jsonl up to its checkpoint): what MLflow lacks of it
        from lorakit.track.plots import read_metrics

        for record in read_metrics(output / "metrics.jsonl"):
            self._queue(record)
        self._flush()
        print(f"tracking: {run_link(uri, run.info.experiment_id, self.run_id)}", file=sys.stderr, flush=True)

    def _queue(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        now = int(time.time() * 1000)
        for key, value in record.items():
            if key != "step" and numeric(value) and step > self.logged.get(key, -1):
                self.pending.append(Metric(key, float(value), now, step))
                self.logged[key] = step
        if "event" in record:  # e.g. {"event": "overfitting", "message": "..."}: a tag lorakit.<event>
            self.pending_tags[f"lorakit.{record['event']}"] = str(record.get("message", record))[:MAX_TAG_CHARS]

    def _flush(self) -> None:
        from mlflow.entities import RunTag

        self.last_flush = time.monotonic()
        if not (self.pending or self.pending_tags):
            return
        metrics, tags = self.pending, [RunTag(k, v) for k, v in self.pending_tags.items()]
        self.pending, self.pending_tags = [], {}
        for i in range(0, max(len(metrics), 1), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS], tags=tags if i == 0 else [],
                                  synchronous=True)

    def _end(self, result: TrainResult) -> None:
        import tempfile

        from lorakit.track.plots import loss_curve, read_metrics

        self.pending_tags["lorakit.stopped"] = result.stopped
        self._flush()
        # the adapter folder as published (adapter files, config.yaml, metrics.jsonl), not its checkpoints
        for f in sorted(result.output.iterdir()):
            if f.is_file() and f.name != RUN_FILE and not f.name.startswith("."):
                self.client.log_artifact(self.run_id, str(f), artifact_path="adapter")
        with tempfile.TemporaryDirectory() as tmp:
            png = loss_curve(read_metrics(result.output / "metrics.jsonl"), Path(tmp) / "loss_curve.png",
                             title=result.output.name)
            self.client.log_artifact(self.run_id, str(png))
        self._terminate("FINISHED")

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.client = None


def run_link(uri: str, experiment: str, run_id: str) -> str:
    """Where to see a run: its page on a tracking server, or the ``mlflow ui`` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    see = f"; see it with: mlflow ui --backend-store-uri {uri}" if uri.startswith(("sqlite:", "file:")) else ""
    return f"MLflow run {run_id} (experiment {experiment}) in {uri}{see}"


def _read_run_file(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _existing_run(client: MlflowClient, run_id: str) -> Any:
    """The run ``run_id`` in this store, or None (never recorded here, or deleted)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None

