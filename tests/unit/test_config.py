"""Config: YAML + CLI overrides, bool flags both ways, the saved config.yaml round trip."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.config import add_config_flags, load_config, save_config
from lorakit.errors import LorakitError


def flags(*argv: str) -> dict:
    """What `lorakit train` hands to load_config for these flags."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return vars(parser.parse_args(list(argv)))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_no_flag_overrides_a_yaml_true_and_plain_flag_a_yaml_false(tmp_path):
    on = write_yaml(tmp_path, "data:\n  packing: true\nmodel:\n  gradient_checkpointing: true\n")
    assert load_config(on, flags("--no-packing")).data.packing is False
    assert load_config(on, flags("--no-gradient-checkpointing")).model.gradient_checkpointing is False
    off = write_yaml(tmp_path, "packing: false\nrslora: false\n")  # flat keys
    cfg = load_config(off, flags("--packing", "--rslora"))
    assert cfg.data.packing is True and cfg.lora.rslora is True


def test_bool_flags_not_given_keep_the_yaml_value(tmp_path):
    path = write_yaml(tmp_path, "data:\n  packing: true\n  group_by_length: false\n")
    cfg = load_config(path, flags("--lr", "1e-3"))
    assert cfg.data.packing is True and cfg.data.group_by_length is False and cfg.train.lr == 1e-3
    assert load_config(path, flags("--group-by-length")).data.group_by_length is True


def test_group_by_length_defaults_on_and_survives_the_saved_config(tmp_path):
    assert load_config(None, flags()).data.group_by_length is True
    cfg = load_config(None, flags("--no-group-by-length"))
    assert cfg.data.group_by_length is False
    save_config(cfg, tmp_path / "config.yaml")
    assert "group_by_length: false" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_resumed_run_must_keep_group_by_length(tmp_path):
    from lorakit.train.loop import _check_same_run

    saved = load_config(None, flags("--no-group-by-length"))
    save_config(saved, tmp_path / "config.yaml")
    _check_same_run(tmp_path / "config.yaml", load_config(tmp_path / "config.yaml", flags("--max-steps", "9")))
    with pytest.raises(LorakitError, match="data.group_by_length is True"):
        _check_same_run(tmp_path / "config.yaml", load_config(tmp_path / "config.yaml", flags("--group-by-length")))


def test_train_help_lists_both_forms_of_bool_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--packing", "--no-packing", "--group-by-length", "--no-group-by-length", "--no-resume"):
        assert flag in out
    assert "36% vs ~80%" in " ".join(out.split())  # a literal % in help text must not break argparse
