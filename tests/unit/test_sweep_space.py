"""The sweep's search space from a config file's sweep: key, and lr-find's suggestion rule."""

from __future__ import annotations

import math

import pytest

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.track.lr_find import centered, size_prior, steepest
from lorakit.track.space import ALPHA_PER_R, Dimension, load_space


def test_space_from_yaml_and_train_reads_the_same_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lora:\n  r: 8\nsweep:\n  lr: {low: 1e-5, high: 1e-2, log: true}\n  r: [4, 8]\n"
                      "  alpha_per_r: [1, 2]\n  warmup_steps: {low: 0, high: 10}\n")
    space = load_space(config)
    assert space == (Dimension("lr", 1e-5, 1e-2, log=True), Dimension("r", choices=(4, 8)),
                     Dimension(ALPHA_PER_R, choices=(1.0, 2.0)), Dimension("warmup-steps", 0, 10, integer=True))
    assert load_config(config).lora.r == 8  # lorakit train passes over the sweep: key
    (tmp_path / "plain.yaml").write_text("lora:\n  r: 8\n")
    assert load_space(tmp_path / "plain.yaml") is None


@pytest.mark.parametrize("entry, message", [
    ("lr: {low: 0, high: 1.0e-2, log: true}", "sweep.lr: a log range needs low > 0"),
    ("dropout: {low: 0, high: 1.5}", "sweep.dropout: 1.5: must be in [0, 1)"),
    ("r: [4, 0]", "sweep.r: 0: must be >= 1"),
    ("schedule: {low: 1, high: 2}", "sweep.schedule: a range needs a numeric option"),
    ("output: [a, b]", "sweep.output: not an option a sweep can vary"),
    ("lr: 1.0e-3", "sweep.lr: expected a list of choices or {low: L, high: H}"),
])
def test_bad_space_names_file_line_and_entry(tmp_path, entry, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"sweep:\n  {entry}\n")
    with pytest.raises(LorakitError) as e:
        load_space(config)
    assert str(e.value).startswith(f"{config}:2: ") and message in str(e.value)


def test_steepest_descent_of_a_known_curve():
    # loss falls fastest (per decade) at lr 1e-3: a logistic step in log10(lr), then blows up past 1e-1
    lrs = [10 ** (-7 + 7 * i / 99) for i in range(100)]
    losses = [5 - 3 / (1 + math.exp(-4 * (math.log10(lr) + 3))) + (50 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    suggestion = steepest(lrs, centered(losses, 100))
    assert 10 ** -3.2 < suggestion < 10 ** -2.8
    assert size_prior(7_000_000_000) == pytest.approx(2e-4) and 1e-3 < size_prior(4_200_000) < 1.5e-3
