"""Every numeric option checked against its declared range before anything is written; all of a YAML's
problems in one message; defaults in --help; negative values after a space (issue 8, items 3, 4, 8, 11)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lorakit.cli import build_parser, main
from lorakit.config import RunConfig, TrainConfig, load_config
from lorakit.errors import LorakitError

# (flag, a bad value, the range the message must name): one per numeric option of `lorakit train`
OUT_OF_RANGE = [
    ("--lr", "-1e-3", "must be > 0"), ("--lr", "0", "must be > 0"), ("--warmup-steps", "-1", "must be >= 0"),
    ("--batch-size", "0", "must be >= 1"), ("--grad-accum", "0", "must be >= 1"), ("--max-steps", "-5", "must be >= 0"),
    ("--epochs", "0", "must be > 0"), ("--seq-len", "1", "must be >= 2"), ("--dropout", "1", "must be in [0, 1)"),
    ("--weight-decay", "-0.1", "must be >= 0"), ("--max-grad-norm", "-1", "must be >= 0"),
    ("--eval-every", "-1", "must be >= 0"), ("--save-every", "-2", "must be >= 0"), ("--log-every", "0", "must be >= 1"),
    ("--keep-last", "-1", "must be >= 0"), ("--patience", "-1", "must be >= 0"), ("--r", "0", "must be >= 1"),
    ("--alpha", "-16", "must be > 0"), ("--val-fraction", "1.5", "must be in [0, 1)"), ("--threads", "-1", "must be >= 0"),
    ("--seed", "-1", "must be >= 0"),
]


@pytest.mark.parametrize("flag,value,valid", OUT_OF_RANGE)
def test_out_of_range_flag_is_one_line_naming_flag_value_and_range(tmp_path, capsys, flag, value, valid):
    output = tmp_path / "out"
    code = main(["train", "--data", str(tmp_path / "never-read.jsonl"), "--output", str(output), flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"lorakit: error: {flag} {float(value):g}: {valid}"]
    assert not output.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(LorakitError, match="--lr: expected a finite number"):
        load_config(None, {"lr": value})


def test_every_numeric_option_declares_its_range():
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else section.default_factory()):
            if f.type in ("int", "float"):
                assert "valid" in f.metadata, f"{section.name}.{f.name} has no declared range"


def test_direct_construction_is_checked_too():
    with pytest.raises(LorakitError, match=r"^--log-every \(train.log_every\) 0: must be >= 1$"):
        TrainConfig(log_every=0)


def test_yaml_with_several_problems_reports_all_with_lines_and_close_matches(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lerning_rate: 1e-3\n  r: 8\n  batch_size: 0\nlora:\n  rnk: 4\nbatch_sise: 4\n"
                    "gradient_accumulation_steps: 2\n")
    with pytest.raises(LorakitError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message
    assert message == (f"6 problems: {path}:2: unknown key train.lerning_rate (did you mean lr?); "
                       f"{path}:3: unknown key train.r (did you mean lora.r?); "
                       f"{path}:4: train.batch_size 0: must be >= 1; "
                       f"{path}:6: unknown key lora.rnk (did you mean r?); "
                       f"{path}:7: unknown key 'batch_sise' (did you mean batch_size?); "
                       f"{path}:8: unknown key 'gradient_accumulation_steps' (did you mean grad_accum?)")


def test_negative_value_after_a_space_is_a_value(capsys):
    args = vars(build_parser().parse_args(["train", "--lr", "-1e-3", "--weight-decay", "-.5", "--seed", "-3"]))
    assert (args["lr"], args["weight-decay"], args["seed"]) == ("-1e-3", "-.5", "-3")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lr", "--no-such-flag"])  # a flag is still not a value
    assert "expected one argument" in capsys.readouterr().err


def test_train_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = TrainConfig()
    for shown in (f"peak learning rate (default: {defaults.lr:g})", "LoRA rank r (default: 8)",
                  "LoRA alpha; scaling = alpha/r (default: 16)", "examples per micro-batch (default: 8)",
                  "(longer ones are truncated) (default: 512)", "linear warmup steps (default: 0)",
                  "cosine or linear decay after warmup (default: cosine)", "(default: auto)",
                  "pack several examples into each sequence (default: false)"):
        assert shown in help_text
    flags = {k: v for k, v in vars(build_parser().parse_args(["train"])).items() if k not in ("command", "func")}
    assert set(flags.values()) == {None}  # no flag typed: none overrides a YAML value


def test_tagline_names_only_registered_subcommands(capsys):
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    stages = parser.description.split(": ", 1)[1].split(" -> ")
    assert len(stages) >= 3 and set(stages) <= commands
    assert ("serve" in parser.description) == ("serve" in commands)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert ("served" in readme.split("\n\n")[1]) == ("serve" in commands)  # the README's opening paragraph
