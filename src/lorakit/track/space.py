"""The search space of ``lorakit sweep``: which options a trial samples, and from what.

A config file's top-level ``sweep:`` key defines it, one entry per option (named as its flag, ``lr``,
``weight_decay``), replacing the default space::

    sweep:
      lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # a range: float, or int for an integer option
      r: [4, 8, 16, 32, 64]                         # choices
      alpha_per_r: [1, 2]                           # alpha as a multiple of r
      dropout: {low: 0, high: 0.1}

Without one, ``DEFAULT_SPACE`` (the issue's): lr log-uniform 1e-5…1e-2, r ∈ {4, 8, 16, 32, 64}, alpha = r or 2r,
dropout uniform in [0, 0.1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import (
    RunConfig,
    did_you_mean,
    key_lines,
    option_field,
    option_names,
    parse_value,
    range_problem,
)
from lorakit.errors import LorakitError

ALPHA_PER_R = "alpha_per_r"  # not an option: alpha = this × the trial's r
UNSWEPT = ("output", "resume", "overwrite", "data", "val-data", "model")  # a trial's identity, not a knob


@dataclass(frozen=True)
class Dimension:
    """One option of the space: a range (``low``..``high``, ``log``-uniform or uniform) or ``choices``."""

    name: str  # the option's flag name without dashes (``lr``, ``weight-decay``) or ALPHA_PER_R
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    integer: bool = False

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this option."""
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} {'log-' if self.log else ''}uniform {self.low:g}..{self.high:g}"


DEFAULT_SPACE = (Dimension("lr", 1e-5, 1e-2, log=True), Dimension("r", choices=(4, 8, 16, 32, 64)),
                 Dimension(ALPHA_PER_R, choices=(1, 2)), Dimension("dropout", 0.0, 0.1))


def load_space(path: str | Path | None) -> tuple[Dimension, ...] | None:
    """The ``sweep:`` space of a config file, checked (every problem names file:line); None when the file has
    no ``sweep:`` key. The file's other keys are ``load_config``'s to check."""
    if path is None:
        return None
    p = Path(path)
    text = p.read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict) or "sweep" not in raw:
        return None
    lines = key_lines(text)
    spec = raw["sweep"]
    if not isinstance(spec, dict) or not spec:
        raise LorakitError(f"{p}:{lines.get(('sweep',), 1)}: sweep: expected a mapping of options to ranges or "
                           "choices, e.g. sweep: {lr: {low: 1.0e-5, high: 1.0e-2, log: true}, r: [8, 16]}")
    if "alpha" in spec and ALPHA_PER_R in spec:
        raise LorakitError(f"{p}:{lines.get(('sweep', 'alpha'), 1)}: sweep: alpha and alpha_per_r both set alpha; "
                           "keep one")
    problems = []
    space = []
    for name, value in spec.items():
        where = f"{p}:{lines.get(('sweep', str(name)), 1)}: sweep.{name}"
        try:
            space.append(dimension(str(name), value, where))
        except LorakitError as e:
            problems.append(str(e))
    if problems:
        raise LorakitError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    return tuple(space)


def dimension(name: str, value: Any, where: str) -> Dimension:
    """One ``sweep:`` entry, checked against the option's type and declared range."""
    key = name.replace("_", "-") if name != ALPHA_PER_R else name
    if key == ALPHA_PER_R:
        tp, f = float, None
    else:
        found = option_field(key)
        if found is None or key in UNSWEPT:
            hint = did_you_mean(key, [n for n in option_names() if n not in UNSWEPT] + [ALPHA_PER_R])
            raise LorakitError(f"{where}: not an option a sweep can vary{hint}")
        _, f, tp = found
    if isinstance(value, list):
        if not value:
            raise LorakitError(f"{where}: an empty list of choices")
        choices = tuple(parse_value(v, tp, where) for v in value)
        for c in choices:
            problem = f is not None and range_problem(f, c)
            if problem or (f is None and c <= 0):
                raise LorakitError(f"{where}: {problem or f'{c:g}: must be > 0'}")
        return Dimension(key, choices=choices)
    if not isinstance(value, dict) or set(value) - {"low", "high", "log"} or not {"low", "high"} <= set(value):
        raise LorakitError(f"{where}: expected a list of choices or {{low: L, high: H}} (log: true for log-uniform), "
                           f"got {value!r}")
    if tp not in (int, float):
        raise LorakitError(f"{where}: a range needs a numeric option; give a list of choices")
    low, high = parse_value(value["low"], tp, f"{where}.low"), parse_value(value["high"], tp, f"{where}.high")
    log = parse_value(value.get("log", False), bool, f"{where}.log")
    if low > high:
        raise LorakitError(f"{where}: low {low:g} > high {high:g}; swap them")
    if log and low <= 0:
        raise LorakitError(f"{where}: a log range needs low > 0, got {low:g}")
    for end in (low, high):
        problem = f is not None and range_problem(f, end)
        if problem:
            raise LorakitError(f"{where}: {problem}")
    return Dimension(key, float(low), float(high), log=log, integer=tp is int)


def trial_options(space: tuple[Dimension, ...], trial: Any, cfg: RunConfig) -> dict[str, Any]:
    """The option values (by flag name) a trial draws; ``alpha_per_r`` becomes ``alpha`` = multiple × r."""
    drawn = {d.name: d.suggest(trial) for d in space}
    multiple = drawn.pop(ALPHA_PER_R, None)
    if multiple is not None:
        drawn["alpha"] = float(multiple * drawn.get("r", cfg.lora.r))
    return drawn
