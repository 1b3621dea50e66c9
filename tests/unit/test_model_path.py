"""A mistyped local model path is refused at once with its close matches, never sent to the hub (issue 8,
item 2). HF_ENDPOINT points at a closed local port: a request that got out would fail, not wait."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.model import resolve_model_path

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture
def online(monkeypatch):
    """The hub is not offline (as for a new user), but unreachable if anything tried it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    """A working folder with a model folder, a near miss's neighbours and a GGUF file."""
    for name in ("base-model", "base-model-v2", "other"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    (tmp_path / "models" / "small.gguf").write_bytes(b"GGUF")
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_mistyped_path_under_an_existing_folder_is_not_a_hub_id(online, models, capsys):
    started = time.monotonic()
    with pytest.raises(LorakitError) as e:
        resolve_model_path("models/base-modle")
    assert str(e.value) == ("--model models/base-modle: no such folder or file; did you mean models/base-model or "
                            "models/base-model-v2?")
    assert main(["train", "--model", "models/base-modle", "--data", "x.jsonl", "--output", "out"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"lorakit: error: {e.value}"]
    assert main(["data", "check", "x.jsonl", "--model", "models/smal.gguf"]) == 2  # the data check's tokenizer too
    assert "did you mean models/small.gguf?" in capsys.readouterr().err
    assert not (models / "out").exists()
    assert time.monotonic() - started < 5  # no retries against a hub


@pytest.mark.parametrize("name,named", [
    ("./modls/other", "did you mean ./models/other?"),
    ("/no/such/model", "give a model folder, a .gguf file or a hub id"),
])
def test_names_that_can_only_be_paths(online, models, name, named):
    with pytest.raises(LorakitError, match="no such folder or file") as e:
        resolve_model_path(name)
    assert str(e.value).endswith(named)


def test_a_hub_id_stays_a_hub_id_online_and_is_refused_offline_when_not_cached(online, models, monkeypatch):
    assert resolve_model_path("someorg/some-model") == "someorg/some-model"  # no local someorg/: the hub's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorakitError, match=r"^--model someorg/some-model: no such local folder, and not a hub "
                                           r"model in the Hugging Face cache \(HF_HUB_OFFLINE is set"):
        resolve_model_path("someorg/some-model")
    assert resolve_model_path("models/base-model") == str(models / "models" / "base-model")


def test_the_bundled_model_still_resolves(online):
    assert resolve_model_path(str(EXAMPLES / "base-model")) == str((EXAMPLES / "base-model").resolve())
