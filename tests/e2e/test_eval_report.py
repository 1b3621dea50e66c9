"""`lorakit eval --adapter A --adapter B --report OUT`: base vs two adapters of one tiny base, known answers,
the report files (one self-contained HTML), loss curves from a run's metrics.jsonl, and the adapter's MLflow
run receiving the metrics and the report."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.config import load_config
from lorakit.train.loop import train
from tests.e2e.test_train import build_tiny_model, write_task
from tests.unit.test_evaluate import TEXT, questions, teach

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """The base, an adapter taught ANSWER (known exact match and F1), a lorakit train run (with metrics.jsonl
    and an MLflow run of its own), the test examples and a retain text."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval_report")
    folder = build_tiny_model(root / "model").resolve()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16))
    teach(model, tok, questions(8))
    lorakit.save_adapter(model, root / "taught", base_model_name_or_path=str(folder))

    run = root / "run"
    train(load_config(None, {"model": str(folder), "data": str(write_task(root / "train.jsonl", 8)),
                             "val_data": str(write_task(root / "val.jsonl", 2, start=50)), "output": str(run),
                             "max_steps": 4, "eval_every": 2, "batch_size": 4, "seq_len": 64, "threads": 1}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval-report", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    (run / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "experiment_id": experiment,
                                                     "run_id": run_id}))
    # two references the taught answer matches exactly, two it contains ("forty two": F1 2/3 each)
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in questions(2, start=300) + questions(2, "forty two", 400)))
    retain = root / "retain.txt"
    retain.write_text(TEXT)
    return {"model": folder, "taught": root / "taught", "run": run, "data": data, "retain": retain, "root": root}


def test_report_compares_base_and_two_adapters(case, capsys):
    out = case["root"] / "report"
    assert main(["eval", "--adapter", str(case["taught"]), "--adapter", str(case["run"]), "--data", str(case["data"]),
                 "--retain", str(case["retain"]), "--report", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["base", "taught", "run"]

    report = json.loads((out / "report.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert list(models) == ["base", "taught", "run"] and report["examples"] == 4
    assert models["taught"]["adapter"] == str(case["taught"].resolve()) and models["base"]["adapter"] is None
    # known answers: ANSWER twice right, then ANSWER against "forty two" (exact 0, F1 2/3) twice
    assert models["taught"]["exact_match"] == 0.5
    assert models["taught"]["f1"] == pytest.approx((1 + 1 + 2 / 3 + 2 / 3) / 4)
    assert models["base"]["exact_match"] == 0.0
    for m in models.values():
        assert m["data_perplexity"] == pytest.approx(torch.tensor(m["data_loss"]).exp().item(), rel=1e-6)
        assert m["perplexity"] > 1 and m == {**printed[m["name"]], "name": m["name"], "adapter": m["adapter"]}
    assert models["taught"]["data_loss"] < models["base"]["data_loss"]  # it learned the reference answers

    assert sorted(p.name for p in out.iterdir()) == ["loss_curves.png", "metrics.png", "report.html", "report.json",
                                                     "report.md"]
    for png in ("metrics.png", "loss_curves.png"):
        assert (out / png).read_bytes().startswith(PNG)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # to share
    md = (out / "report.md").read_text()
    assert "| model | exact match | token F1 |" in md and "| taught | 50.0%" in md and "![metrics](metrics.png)" in md

    # one file that opens with no network: nothing to fetch, every image inline
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (out / "metrics.png").read_bytes()


def test_the_runs_mlflow_record_gets_the_metrics_and_the_report(case, capsys):
    from mlflow.tracking import MlflowClient

    out = case["root"] / "report-mlflow"
    assert main(["eval", "--adapter", str(case["run"]), "--data", str(case["data"]), "--report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    run = json.loads((case["run"] / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    metrics = client.get_run(run["run_id"]).data.metrics
    report = {m["name"]: m for m in json.loads((out / "report.json").read_text())["models"]}
    assert metrics["report_exact_match"] == report["adapter"]["exact_match"]
    assert metrics["report_base_data_loss"] == pytest.approx(report["base"]["data_loss"])
    logged = {f.path for f in client.list_artifacts(run["run_id"], "eval_report")}
    assert {"eval_report/report.html", "eval_report/report.json", "eval_report/metrics.png"} <= logged


def test_unreachable_store_is_one_warning_and_the_report_stands(case, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for f in case["run"].iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    (run / "mlflow_run.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:9", "experiment_id": "0",
                                                    "run_id": "0" * 32}))
    assert main(["eval", "--adapter", str(run), "--data", str(case["data"]), "--report", str(tmp_path / "r")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not logged to MLflow" in warnings[0]
    assert (tmp_path / "r" / "report.html").is_file()


def test_bad_report_inputs_are_one_line(case, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    for args, named in ((["--report", str(file)], "--report"), (["--adapter", str(tmp_path / "nope")], "--adapter")):
        assert main(["eval", "--adapter", str(case["taught"]), "--data", str(case["data"]), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lorakit: error: {named}")
