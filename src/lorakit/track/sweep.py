"""`lorakit sweep`: an Optuna study over one base config; each trial is one ``train`` run in this process.

A trial draws its options from the space (``track/space.py``), trains into ``OUTPUT/trial-NNNN`` and reports
the objective (validation loss, or another eval metric) at every evaluation to Optuna's median pruner, which
stops a trial at once when it is worse than the median of earlier trials at the same step (``Pruning``, a
``train/callbacks.py`` hook). A trial whose loss turns non-finite counts as pruned: it is a result (this lr
is too high), not an error.

The study is the state. Its storage is a journal file (``OUTPUT/study.journal``) by default: Optuna's
JournalFileBackend appends each change as one record under a lock file, which is safe for several worker
processes on one machine; SQLite is not (concurrent writers get "database is locked", Optuna's own docs
advise against it for parallel workers). An RDB URL (``postgresql://...``) lets workers on many machines share
one study: start the same command on each. ``--trials N`` counts the study's finished trials (complete or
pruned) and the running ones, so rerunning an interrupted command finishes the sweep, and two workers
started at once run N trials between them, not N each. A trial interrupted by Ctrl-C is queued again with
the same options and resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import OBJECTIVES, RunConfig, SweepConfig, config_to_dict, replace_options
from lorakit.errors import Interrupted, LorakitError
from lorakit.fileio import write_atomic
from lorakit.track.space import DEFAULT_SPACE, Dimension, trial_options
from lorakit.train.callbacks import Callback, StopTraining

HELD_OUT = 0.1  # the fraction of the training data a sweep without validation data holds out
JOURNAL = "study.journal"
SWEEP_FILE = "sweep.json"  # which study this output folder belongs to
WORKER_ENV = "LORAKIT_SWEEP_WORKER"  # set in the worker processes --n-jobs starts: they leave the summary to the first
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def require_track_extra(command: str) -> None:
    """Optuna and matplotlib come with lorakit's ``track`` extra."""
    import importlib.util

    missing = [m for m in ("optuna", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise LorakitError(f"{command} needs {' and '.join(missing)}: pip install 'lorakit[track]'")


class Pruning(Callback):
    """Reports the objective of each eval record to the trial and stops the run when the pruner says so."""

    def __init__(self, trial: Any, objective: str):
        self.trial, self.objective = trial, objective
        self.values: list[float] = []  # the objective at each eval
        self.published: float | None = None  # at the eval with the lowest eval_loss: what --keep-best publishes
        self.best_loss = math.inf
        self.started = False

    def on_start(self, cfg: RunConfig, output: Path, state: dict[str, Any]) -> None:
        self.started = True

    def on_log(self, record: dict[str, Any]) -> None:
        if self.objective not in record:
            return
        value = float(record[self.objective])
        self.values.append(value)
        if record.get("eval_loss", math.inf) < self.best_loss:
            self.best_loss, self.published = record["eval_loss"], value
        self.trial.report(value, record["step"])
        if self.trial.should_prune():
            raise StopTraining("pruned")


@dataclass
class Sweep:
    """Everything a worker needs, checked before anything is written."""

    cfg: RunConfig  # the fixed part (validation data and eval cadence settled)
    options: SweepConfig
    space: tuple[Dimension, ...]
    output: Path
    study_name: str
    storage: str  # the URL or journal path, as given (shown with the password hidden)
    notes: list[str]  # what the sweep settled for the user (printed once the storage is open)
    parent_run_id: str = ""  # the sweep's MLflow run, each trial's run nested under it ("" untracked)


def prepare(cfg: RunConfig, options: SweepConfig, space: tuple[Dimension, ...] | None, fixed: set[str]) -> Sweep:
    """Check the sweep's inputs and settle what every trial shares; nothing is written. ``fixed``: the flags
    typed on the command line, which take their option out of the space."""
    t = cfg.train
    if options.objective in ("eval_exact_match", "eval_f1") and not getattr(t, "eval_generate", 0):
        raise LorakitError(f"--objective {options.objective}: generation metrics are measured with "
                           "--eval-generate K (greedy answers on K validation records); add it")
    notes = []
    given = space or DEFAULT_SPACE
    space = tuple(d for d in given if d.name not in fixed and not (d.name == "alpha_per_r" and "alpha" in fixed))
    if len(space) < len(given):
        notes.append("fixed by flags, not searched: " + ", ".join(d.name for d in given if d not in space))
    if not space:
        raise LorakitError("sweep: every option of the space is fixed by a flag; nothing to search")
    if not cfg.data.val and cfg.data.val_fraction == 0:
        cfg = replace_options(cfg, {"val-fraction": HELD_OUT})
        notes.append(f"no --val-data: holding out {HELD_OUT:.0%} of {cfg.data.train} for validation "
                     f"(seed {t.seed}, the same records in every trial)")
    if not t.eval_every:
        if not t.max_steps:
            raise LorakitError("sweep: the pruner needs the validation loss during training: set --eval-every N "
                               "(or --max-steps, and the sweep evaluates 10 times per trial)")
        cfg = replace_options(cfg, {"eval-every": max(1, t.max_steps // 10)})
        notes.append(f"evaluating every {cfg.train.eval_every} steps (--eval-every) for the pruner")
    if options.n_jobs > 1 and not t.threads:  # the workers share the cores, as torchrun's ranks do
        from lorakit.device import cpu_threads

        cfg = replace_options(cfg, {"threads": max(1, cpu_threads() // options.n_jobs)})
        notes.append(f"{options.n_jobs} worker processes, {cfg.train.threads} torch threads each")
    output = Path(t.output)
    storage = options.storage or str(output / JOURNAL)
    if "://" not in storage and storage != str(output / JOURNAL) and not Path(storage).parent.is_dir():
        raise LorakitError(f"--storage {storage}: its folder does not exist; create it or give a database URL")
    study_name = options.study_name or output.resolve().name
    _check_output(output, study_name, storage)
    return Sweep(cfg, options, space, output, study_name, storage, notes)


def run_sweep(sweep: Sweep, worker_argv: list[str] | None = None) -> dict[str, Any] | None:
    """Open (or create) the study, run this worker's trials (and ``n_jobs - 1`` worker processes started with
    ``worker_argv``), then write and print the summary. Returns the summary (None in a worker process)."""
    import optuna

    # Optuna's own lines (a failed trial's traceback among them) would repeat what lorakit prints in one line
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    journal = "://" not in sweep.storage
    storage = None if journal else _open_rdb(sweep.storage)  # a bad URL stops here, before any folder
    for note in sweep.notes:
        print(f"sweep: {note}", file=sys.stderr)
    sweep.output.mkdir(parents=True, exist_ok=True)
    if journal:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        storage = JournalStorage(JournalFileBackend(sweep.storage, lock_obj=JournalFileOpenLock(sweep.storage)))
    write_atomic(sweep.output / SWEEP_FILE, lambda p: p.write_text(json.dumps(
        {"study_name": sweep.study_name, "storage": _shown(sweep.storage)}, indent=1) + "\n"))
    sampler = _sampler(sweep.cfg.train.seed, sweep.options.trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    try:
        study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction=sweep.options.direction,
                                    sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:  # a rerun, or another worker's study
        study = optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    _check_same_study(study, sweep)
    _fail_dead_trials(study)
    sweep.parent_run_id = parent_run(study, sweep, created)
    workers = []
    if sweep.options.n_jobs > 1 and worker_argv is not None:
        cmd = [sys.executable, "-m", "lorakit", *worker_argv, "--n-jobs", "1",
               "--threads", str(sweep.cfg.train.threads)]
        workers = [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: "1"}) for _ in range(sweep.options.n_jobs - 1)]
    try:
        _work(study, sweep)
    finally:
        for w in workers:
            w.wait()
    if os.environ.get(WORKER_ENV):
        return None
    return summarize(study, sweep)


def _work(study: Any, sweep: Sweep) -> None:
    """Run trials until the study holds ``--trials`` finished or running ones (or ``--timeout`` passes)."""
    import optuna
    from optuna.trial import TrialState

    started = time.monotonic()
    while not (sweep.options.timeout and time.monotonic() - started > sweep.options.timeout):
        counts = _counts(study)
        if counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] + counts[TrialState.RUNNING] >= sweep.options.trials:
            return
        try:
            study.optimize(lambda trial: _trial(trial, sweep), n_trials=1, catch=())
        except _Surplus:
            return
        except KeyboardInterrupt as e:
            finished = sum(t.state.is_finished() and t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False))
            raise Interrupted(f"sweep interrupted with {finished} of {sweep.options.trials} trials finished; the "
                              "study keeps them: rerun the same command to continue (the interrupted trial "
                              "resumes from its checkpoint)", getattr(e, "exit_code", 130)) from None
        except optuna.exceptions.StorageInternalError as e:
            raise LorakitError(f"--storage {_shown(sweep.storage)}: {e}") from None


class _Surplus(Exception):
    """Two workers asked for the last trial at once: the later one gives its trial up."""


def _trial(trial: Any, sweep: Sweep) -> float:
    import optuna
    from optuna.trial import TrialState

    ahead = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.RUNNING)) if t.number < trial.number]
    if len(ahead) >= sweep.options.trials:
        trial.set_user_attr("surplus", True)
        raise _Surplus
    trial.set_user_attr("worker", WORKER)
    options = trial_options(sweep.space, trial, sweep.cfg)
    resume_from = trial.user_attrs.get("resume_from")
    output = Path(resume_from) if resume_from else sweep.output / f"trial-{trial.number:04d}"
    nested = {"parent-run-id": sweep.parent_run_id} if sweep.parent_run_id else {}
    cfg = replace_options(sweep.cfg, {**options, "output": str(output), "resume": bool(resume_from), **nested})
    trial.set_user_attr("options", options)
    trial.set_user_attr("output", str(output))
    print(f"sweep: trial {trial.number}: " + _options_text(options), file=sys.stderr, flush=True)
    pruning = Pruning(trial, sweep.options.objective)
    from lorakit.train.loop import train

    try:
        result = train(cfg, callbacks=[pruning])
    except LorakitError as e:
        if not pruning.started:  # bad input: every trial would fail alike
            raise
        trial.set_user_attr("diverged", str(e))  # a non-finite loss: this corner of the space is bad
        raise optuna.TrialPruned(str(e)) from None
    except KeyboardInterrupt:
        if pruning.started:  # queued again: the next run of the command resumes it from its checkpoint
            trial.study.enqueue_trial(trial.params, user_attrs={"resume_from": str(output)})
        raise
    trial.set_user_attr("steps", result.steps)
    if result.stopped == "pruned":
        raise optuna.TrialPruned(f"at step {result.steps}")
    if not pruning.values:
        raise LorakitError(f"trial {trial.number}: no {sweep.options.objective} was logged; check --val-data")
    # the objective of the adapter the trial published: the lowest eval_loss's with --keep-best, else the last
    if sweep.cfg.train.keep_best and pruning.published is not None:
        return pruning.published
    return pruning.values[-1]


# --- storage, study ------------------------------------------------------------------------------


def _open_rdb(url: str) -> Any:
    """An RDBStorage, connected now, with heartbeats: a trial whose worker died on another machine is failed
    and queued again once its heartbeat is 3 minutes old."""
    import optuna

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=60, grace_period=180,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as e:  # sqlalchemy's URL, driver and connection errors, optuna's schema errors
            from sqlalchemy.exc import IntegrityError, ProgrammingError

            # workers started at once on a new database race to create Optuna's tables: the loser finds them made
            if isinstance(e, (IntegrityError, ProgrammingError)) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LorakitError(f"--storage {_shown(url)}: cannot open it ({reason[:300]}); give a reachable database "
                               "URL (postgresql://USER:PASSWORD@HOST/DB, mysql://..., sqlite:///FILE) or a journal "
                               "file path") from None
    raise AssertionError("unreachable")


def _shown(url: str) -> str:
    """The storage URL with its password hidden."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://")[0] + "://..."


def _check_output(output: Path, study_name: str, storage: str) -> None:
    """The output folder is new, empty, or this study's (its sweep.json names the same study)."""
    if output.exists() and not output.is_dir():
        raise LorakitError(f"--output {output}: exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        return
    marker = output / SWEEP_FILE
    if not marker.is_file():
        raise LorakitError(f"--output {output}: not empty and not a sweep's folder (no {SWEEP_FILE}); choose a new "
                           "folder")
    try:
        known = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise LorakitError(f"{marker}: unreadable ({e}); choose a new --output") from None
    if known.get("study_name") != study_name or known.get("storage") != _shown(storage):
        raise LorakitError(f"--output {output}: holds study {known.get('study_name')!r} in {known.get('storage')}; "
                           f"its trial folders would mix with study {study_name!r}: use the same --study-name and "
                           "--storage, or a new --output")


def _check_same_study(study: Any, sweep: Sweep) -> None:
    """A study continued by a rerun (or joined by another worker) must be the same search."""
    mine = {"base": json.loads(json.dumps(config_to_dict(sweep.cfg))), "objective": sweep.options.objective,
            "space": [dataclasses.asdict(d) for d in sweep.space]}
    mine = json.loads(json.dumps(mine))  # tuples as lists, as the storage returns them
    known = study.user_attrs.get("sweep")
    if known is None:
        study.set_user_attr("sweep", mine)
        return
    if study.direction.name.lower() != sweep.options.direction:
        raise LorakitError(f"study {sweep.study_name!r} {study.direction.name.lower()}s; this command would "
                           f"{sweep.options.direction}: use the same --direction or a new --study-name")
    for key in ("objective", "space"):
        if known.get(key) != mine[key]:
            raise LorakitError(f"study {sweep.study_name!r} was started with another {key} ({known.get(key)}); "
                               "run the same command to continue it, or use a new --study-name")
    for section, values in mine["base"].items():
        if section == "track":  # where the record goes, not what is searched
            continue
        for name, value in values.items():
            before = known["base"].get(section, {}).get(name)
            if before != value and name not in ("threads", "output", "resume", "overwrite"):
                raise LorakitError(f"study {sweep.study_name!r}: {section}.{name} is {value!r} but the study's trials "
                                   f"used {before!r}; run the same command to continue it, or use a new --study-name")


def _fail_dead_trials(study: Any) -> None:
    """Trials left RUNNING by a worker process of this machine that no longer exists (killed): failed, and
    queued again to resume from their checkpoint. (Other machines' are the RDB heartbeat's.)"""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another worker got there first
            continue
        if t.user_attrs.get("output"):
            study.enqueue_trial(t.params, user_attrs={"resume_from": t.user_attrs["output"]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts(study: Any) -> dict[Any, int]:
    from optuna.trial import TrialState

    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _sampler(seed: int, trials: int) -> Any:
    """TPE (constant liar: running trials count as bad, so parallel workers spread out), seeded per trial from
    (seed, trial number): one worker's sweep is reproducible, and workers started at once with one seed
    still draw different values. Its random start is a third of the trials (at most Optuna's 10), so a
    12-trial sweep is 4 random trials and 8 guided ones, not 10 and 2."""
    from optuna.samplers import BaseSampler, TPESampler

    def tpe(trial_seed: int) -> TPESampler:
        return TPESampler(seed=trial_seed, constant_liar=True, n_startup_trials=max(2, min(10, trials // 3)))

    class TrialSeeded(BaseSampler):
        def __init__(self) -> None:
            self.inner = tpe(seed)

        def before_trial(self, study, trial):
            self.inner = tpe((seed * 1_000_003 + trial.number) % 2**32)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return TrialSeeded()


# --- MLflow: the sweep's parent run ------------------------------------------------------------------


PARENT_ATTR = "mlflow_parent_run_id"  # a study user attr: one parent run for all the study's workers


def parent_run(study: Any, sweep: Sweep, created: bool) -> str:
    """The id of the sweep's MLflow run, each trial's run nested under it, in the store and experiment the
    trials use (``track/mlflow.py``); "" when runs are not tracked (``--no-track``, ``LORAKIT_TRACK=0``) or
    the store fails (one warning line: the sweep goes on untracked). The worker that created the study
    creates the run; the others (started at once) wait a moment for its id."""
    from lorakit.track.mlflow import MLflowCallback
    from lorakit.train.loop import default_callbacks

    if not any(isinstance(c, MLflowCallback) for c in default_callbacks(sweep.cfg)):
        return ""
    for _ in range(0 if created else 40):
        known = study.user_attrs.get(PARENT_ATTR)
        if known is not None:
            break
        time.sleep(0.25)
    if study.user_attrs.get(PARENT_ATTR):
        return study.user_attrs[PARENT_ATTR]
    run_id = _tracking("not tracked in MLflow", lambda: _create_parent(sweep))
    study.set_user_attr(PARENT_ATTR, run_id or "")
    return run_id or ""


def _create_parent(sweep: Sweep) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from lorakit.track.mlflow import experiment_id, run_link, tracking_uri

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = experiment_id(client, sweep.cfg.track.experiment, uri)
    run = client.create_run(exp, run_name=sweep.cfg.track.run_name or sweep.study_name,
                            tags={"mlflow.source.name": "lorakit sweep", "lorakit.sweep.study": sweep.study_name,
                                  "lorakit.sweep.storage": _shown(sweep.storage)})
    o = sweep.options
    params = {"sweep.trials": o.trials, "sweep.objective": o.objective, "sweep.direction": o.direction,
              "sweep.space": "; ".join(d.describe() for d in sweep.space)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
    print(f"sweep: {run_link(uri, exp, run.info.run_id)}; each trial nested under it", file=sys.stderr)
    return run.info.run_id


def record_summary(sweep: Sweep, summary: dict[str, Any], finished: bool) -> None:
    """The best value and options, and the summary's files, on the parent run; finished once no trial runs."""

    def record() -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag

        from lorakit.track.mlflow import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri())
        best = summary["best"]
        if best:
            now = int(time.time() * 1000)
            client.log_batch(sweep.parent_run_id, metrics=[Metric(f"best_{sweep.options.objective}", best["value"], now, 0)],
                             tags=[RunTag("lorakit.sweep.best_trial", str(best["number"]))]
                             + [RunTag(f"lorakit.sweep.best.{k}", str(v)) for k, v in best["options"].items()],
                             synchronous=True)
        for name in ("summary.json", "best.yaml", "lr_vs_objective.png"):
            if (sweep.output / name).is_file():
                client.log_artifact(sweep.parent_run_id, str(sweep.output / name))
        if finished:
            client.set_terminated(sweep.parent_run_id, status="FINISHED")

    _tracking("the sweep's MLflow run was not updated", record)


def _tracking(what: str, call: Any) -> Any:
    """``call()`` with MLflow kept quiet; a failure is one warning line and None."""
    from lorakit.track.mlflow import quiet_calls

    try:
        with quiet_calls():
            return call()
    except Exception as e:  # noqa: BLE001 - tracking never stops a sweep
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"warning: {what}: {reason}", file=sys.stderr, flush=True)
        return None


# --- the summary ---------------------------------------------------------------------------------------


def summarize(study: Any, sweep: Sweep) -> dict[str, Any]:
    """The table of trials, best.yaml, the importance ranking and the lr plot; summary.json holds them all."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    rows = [{"number": t.number, "state": t.state.name.lower(),
             "value": _value(t) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
             "options": t.user_attrs.get("options", {}), "steps": t.user_attrs.get("steps"),
             "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
             "note": "diverged" if t.user_attrs.get("diverged") else
             f"resumed {Path(t.user_attrs['resume_from']).name}" if t.user_attrs.get("resume_from") else ""}
            for t in trials]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {"study": sweep.study_name, "storage": _shown(sweep.storage),
                               "objective": sweep.options.objective, "direction": sweep.options.direction,
                               "trials": rows, "best": None, "importance": None}
    objective = sweep.options.objective
    print(f"\nstudy {sweep.study_name!r} ({_shown(sweep.storage)}): {len(done)} complete, "
          f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
          f"{sum(t.state == TrialState.FAIL for t in trials)} failed, "
          f"{sum(t.state == TrialState.RUNNING for t in trials)} running; {objective} ({sweep.options.direction})")
    _print_table(rows, objective)
    if done:
        best = study.best_trial
        best_cfg = replace_options(sweep.cfg, {**best.user_attrs["options"],
                                               "output": str(sweep.output / "best")})
        path = sweep.output / "best.yaml"
        header = (f"# lorakit sweep {sweep.study_name}: trial {best.number}, {objective} {best.value:.6g}; "
                  f"train it with: lorakit train {path}\n")
        write_atomic(path, lambda p: p.write_text(header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False)))
        summary["best"] = {"number": best.number, "value": best.value, "options": best.user_attrs["options"],
                           "config": str(path)}
        print(f"best: trial {best.number}, {objective} {best.value:.6g} ({_options_text(best.user_attrs['options'])}); "
              f"its config: {path} (lorakit train {path})")
    if len(done) >= 2:
        summary["importance"] = _importance(study)
    plot = _plot_lr(trials, sweep)
    if plot:
        summary["plot"] = str(plot)
        print(f"learning rate vs {objective}: {plot}")
    write_atomic(sweep.output / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"))
    if sweep.parent_run_id:
        record_summary(sweep, summary, finished=not any(t.state == TrialState.RUNNING for t in trials))
    return summary


def _value(trial: Any) -> float | None:
    """A complete trial's objective; a pruned one's last reported value (None if it reported none)."""
    if trial.value is not None:
        return trial.value
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def _options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in options.items())


def _print_table(rows: list[dict[str, Any]], objective: str) -> None:
    names = list(dict.fromkeys(k for r in rows for k in r["options"]))
    header = ["#", *names, objective, "state", "steps", "time"]
    table = [header]
    for r in rows:
        o = r["options"]
        table.append([str(r["number"]), *(f"{o[n]:.3g}" if isinstance(o.get(n), float) else str(o.get(n, "")) for n in names),
                      "" if r["value"] is None else f"{r['value']:.4f}",
                      r["state"] + (f" ({r['note']})" if r["note"] else ""), str(r["steps"] or ""),
                      "" if r["duration_s"] is None else f"{r['duration_s']:.1f} s"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _importance(study: Any) -> dict[str, float] | None:
    """Optuna's fANOVA importance of each sampled parameter (complete trials), printed as a ranking."""
    import optuna

    try:
        ranking = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:  # e.g. a parameter that never varied
        print(f"importance: not computed ({e})")
        return None
    print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in ranking.items()))
    return {k: float(v) for k, v in ranking.items()}


def _plot_lr(trials: list[Any], sweep: Sweep) -> Path | None:
    """OUTPUT/lr_vs_objective.png: complete trials as dots, pruned ones (their last value) as crosses."""
    points = [(t.user_attrs.get("options", {}).get("lr"), _value(t), t.state.name) for t in trials]
    points = [(lr, v, s) for lr, v, s in points if lr is not None and v is not None and math.isfinite(v)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker, label in (("COMPLETE", "o", "complete"), ("PRUNED", "x", "pruned (last eval)")):
        xs = [lr for lr, _, s in points if s == state]
        ys = [v for _, v, s in points if s == state]
        if xs:
            ax.scatter(xs, ys, marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(sweep.options.objective)
    ax.set_title(f"lorakit sweep {sweep.study_name}")
    ax.legend()
    fig.tight_layout()
    path = sweep.output / "lr_vs_objective.png"
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path


def worker_argv(config: str | None, flags: dict[str, Any]) -> list[str]:
    """The ``lorakit sweep`` command line of ``config`` and the flags typed (argparse's dests, ``None``: not
    given), which the ``--n-jobs`` worker processes run."""
    argv = ["sweep", *([config] if config else [])]
    for name, value in flags.items():
        if value is None or name == "n-jobs":
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            for item in value if isinstance(value, list) else [value]:
                argv += [f"--{name}", str(item)]
    return argv


def sweep_command(cfg: RunConfig, options: SweepConfig, space: tuple[Dimension, ...] | None, fixed: set[str],
                  argv: list[str]) -> int:
    require_track_extra("lorakit sweep")
    run_sweep(prepare(cfg, options, space, fixed), argv)
    return 0


__all__ = ["OBJECTIVES", "Pruning", "Sweep", "prepare", "run_sweep", "summarize", "sweep_command", "worker_argv"]
