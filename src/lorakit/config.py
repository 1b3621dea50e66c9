"""One tree of typed dataclasses: loaded from YAML, overridden by CLI flags, saved with each run.

Each option is declared once, as a dataclass field. Its CLI flag is derived from the field name
(``--batch-size`` for ``batch_size``) unless ``metadata["flag"]`` names another, and its help text is
``metadata["help"]``; a numeric field's valid values are ``metadata["valid"]`` (a ``Range``), checked for
YAML values, flags and direct construction alike. A YAML file uses the same tree (``lora: {r: 8}``) or, for
convenience, the flat flag names at top level (``r: 8``, ``lr: 1e-4``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: ``low`` and/or ``high`` bounds, each inclusive unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return ((self.low is None or value > self.low or (value == self.low and not self.low_open))
                and (self.high is None or value < self.high or (value == self.high and not self.high_open)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def _opt(default: Any, help: str, flag: str | None = None, valid: Range | None = None,
         aliases: tuple[str, ...] = (), repeat: bool = False, **kw: Any) -> Any:
    meta: dict[str, Any] = {"help": help}
    if flag:
        meta["flag"] = flag
    if repeat:  # a list flag that may be given several times (--adapter a=X --adapter b=Y)
        meta["repeat"] = True
    if valid is not None:
        meta["valid"] = valid
    if aliases:
        meta["aliases"] = aliases
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


INIT_METHODS = ("kaiming", "gaussian", "pissa")
QUANTIZATIONS = ("none", "int8", "nf4")
TASKS = ("auto", "text", "text-to-image")


@dataclass
class LoraConfig:
    """The LoRA update W' = W + scaling·B·A (Hu et al. 2021, §4.1).

    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
    ``target_modules``: a list of module names (suffix match, as PEFT), a regex string
    (full match on the module path, as PEFT), ``"all-linear"`` (every linear layer but the output head),
    or ``"auto"``: all-linear on a language model, the attention projections (to_q, to_k, to_v, to_out.0)
    on a diffusion denoiser, as diffusers' and kohya's training scripts do.
    """

    # --lora-r too: torchrun reads any prefix of its own options, even after the script, and takes "--r" for
    # an ambiguous --rdzv-*/--role/--run-path/--redirects
    r: int = _opt(8, "LoRA rank r", valid=AT_LEAST_ONE, aliases=("--lora-r",))
    alpha: float = _opt(16.0, "LoRA alpha; scaling = alpha/r", valid=POSITIVE)
    dropout: float = _opt(0.0, "dropout on the LoRA path's input", valid=FRACTION)
    target_modules: list[str] | str = _opt("auto", "comma list of module names, a regex, all-linear, or auto (all-linear; "
                                           "to_q,to_k,to_v,to_out.0 on a diffusion denoiser)", flag="--target")
    exclude_modules: list[str] = _opt([], "comma list of module names to leave alone", flag="--exclude")
    rslora: bool = _opt(False, "scale by alpha/sqrt(r) (rsLoRA)")
    init: str = _opt("kaiming", "kaiming (B=0: a no-op), gaussian, or pissa")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [t.strip() for t in self.exclude_modules.split(",") if t.strip()]
        check_ranges(self, "lora")
        if self.init not in INIT_METHODS:
            raise LorakitError(f"lora.init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)


@dataclass
class ModelConfig:
    name_or_path: str = _opt("examples/base-model", "local folder or hub id of the base model", flag="--model")
    dtype: str = _opt("auto", "weights dtype: auto (bf16 where supported), bfloat16, float16, float32")
    quantization: str = _opt("none", "frozen base: none, int8 or nf4 (QLoRA)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    task: str = _opt("auto", "text (a causal LM) or text-to-image (a diffusers pipeline folder); auto: text-to-image "
                     "when --model holds model_index.json")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LorakitError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.quantization not in QUANTIZATIONS:
            raise LorakitError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise LorakitError(f"model.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass
class DataConfig:
    train: str = _opt("", "training data: JSON array or JSONL", flag="--data")
    val: str = _opt("", "validation data (JSON/JSONL); else a fraction of --data", flag="--val-data")
    val_fraction: float = _opt(0.0, "hold out this fraction of --data for validation when --val-data is absent",
                               valid=FRACTION)
    format: str = _opt("auto", "auto, alpaca, chat, sharegpt, prompt_completion or text")
    seq_len: int = _opt(512, "maximum tokens per example (longer ones are truncated)", valid=Range(2))
    train_on_prompt: bool = _opt(False, "also compute the loss on prompt tokens")
    packing: bool = _opt(False, "pack several examples into each sequence")
    group_by_length: bool = _opt(True, "micro-batches of similar-length examples: less padding, faster. Turn off "
                                 "(a random order per epoch) when an example's length predicts its answer: "
                                 "length-homogeneous micro-batches then push each step towards one answer "
                                 "(examples/configs/quickstart.yaml: 36% vs ~80% exact match)")

    def __post_init__(self) -> None:
        check_ranges(self, "data")


@dataclass
class TrainConfig:
    output: str = _opt("runs/default", "output folder")
    method: str = _opt("lora", "lora, or full (train every weight: the baseline)")
    max_steps: int = _opt(0, "optimizer steps (0: derive from --epochs)", valid=NON_NEGATIVE)
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is 0", valid=POSITIVE)
    lr: float = _opt(2e-4, "peak learning rate", valid=POSITIVE)
    schedule: str = _opt("cosine", "cosine or linear decay after warmup")
    warmup_steps: int = _opt(0, "linear warmup steps", valid=NON_NEGATIVE)
    weight_decay: float = _opt(0.0, "AdamW weight decay", valid=NON_NEGATIVE)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)", valid=NON_NEGATIVE)
    batch_size: int = _opt(8, "examples per micro-batch", valid=AT_LEAST_ONE)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", valid=AT_LEAST_ONE)
    precision: str = _opt("auto", "auto (bf16 autocast where it makes this model's step faster on this machine: "
                          "measured once, cached), bf16 or fp32")
    compile: bool = _opt(False, "torch.compile each decoder layer (transformers' own, LoRA inside) instead of "
                         "lorakit's fused eager layers; the first run compiles (cached in $LORAKIT_CACHE/inductor)")
    save_every: int = _opt(0, "write checkpoints/step-N every N steps (0: off)", valid=NON_NEGATIVE)
    keep_last: int = _opt(2, "checkpoints to keep (0: all)", valid=NON_NEGATIVE)
    eval_every: int = _opt(0, "evaluate on validation data every N steps (0: at the end only)",
                             valid=NON_NEGATIVE)
    patience: int = _opt(0, "early stopping: evals without validation-loss improvement (0: off)",
                           valid=NON_NEGATIVE)
    # off by default: text-format validation data has no answers, and greedy decoding costs what the answers'
    # length and the model's size make it (seconds per eval on a 135M model on CPU), unlike eval_loss
    eval_generate: int = _opt(0, "at every eval, greedy answers to the first K validation records: their exact "
                              "match and token F1 are logged as eval_exact_match and eval_f1 (text task only: the "
                              "image task ignores it; 0: off)", valid=NON_NEGATIVE)
    keep_best: bool = _opt(True, "publish the weights of the best evaluation (lowest eval_loss), not the last "
                           "step's; kept in OUTPUT/best while training. Applies when there is validation data")
    log_every: int = _opt(1, "write a metrics.jsonl record every N steps", valid=AT_LEAST_ONE)
    seed: int = _opt(0, "random seed (data order, init, dropout)", valid=NON_NEGATIVE)
    resume: bool = _opt(False, "continue from the newest complete checkpoint in --output")
    overwrite: bool = _opt(False, "replace a non-empty --output")
    threads: int = _opt(0, "torch CPU threads (0: the cores this process may use, shared among the ranks on one "
                        "machine)", valid=NON_NEGATIVE)
    strategy: str = _opt("ddp", "with torchrun/accelerate launch: ddp (every rank holds the model; LoRA gradients "
                         "all-reduced) or fsdp (FSDP2: the base sharded across ranks, for bases too big for one device)")
    # 45 s: a hung rank stops the job within a minute, timeout plus tear-down
    dist_timeout: float = _opt(45.0, "with several processes: seconds a training step waits for the other ranks "
                               "before the job stops (a hung rank); raise it if ranks' steps can differ more",
                               valid=POSITIVE)

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        if self.method not in ("lora", "full"):
            raise LorakitError(f"--method must be lora or full, got {self.method!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LorakitError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise LorakitError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.schedule not in ("cosine", "linear"):
            raise LorakitError(f"--schedule must be cosine or linear, got {self.schedule!r}")


@dataclass
class DiffusionConfig:
    """Text-to-image training (``--task text-to-image``): the image data and the denoising objective."""

    resolution: int = _opt(0, "training image size in pixels (0: the pipeline's native size)", valid=NON_NEGATIVE)
    crop: str = _opt("center", "center or random: how an image resized to --resolution (short side) is cropped")
    random_flip: bool = _opt(False, "flip half the images left-right (not for captions that say left/right)")
    trigger_word: str = _opt("", "prepended to every caption (\"zwx\" -> \"zwx, a red circle\")")
    train_text_encoder: bool = _opt(False, "also put LoRA on the text encoder(s) (q,k,v,out projections)")
    prediction_type: str = _opt("auto", "auto (the scheduler's: epsilon or v_prediction; flow matching for SD3/Flux), "
                                "epsilon or v_prediction")
    snr_gamma: float = _opt(0.0, "min-SNR-γ loss weighting (Hang et al. 2023; 5 is typical; 0: off)",
                            valid=NON_NEGATIVE)
    noise_offset: float = _opt(0.0, "add this times per-channel noise (darker darks, brighter brights; 0.05-0.1)",
                               valid=NON_NEGATIVE)
    cache_latents: bool = _opt(True, "encode each image once with the frozen VAE (not with --crop random)")
    kohya: bool = _opt(False, "also write the kohya/A1111 file (lora_kohya.safetensors) beside diffusers' file")

    def __post_init__(self) -> None:
        check_ranges(self, "diffusion")
        if self.crop not in ("center", "random"):
            raise LorakitError(f"--crop must be center or random, got {self.crop!r}")
        if self.prediction_type not in ("auto", "epsilon", "v_prediction"):
            raise LorakitError(f"--prediction-type must be auto, epsilon or v_prediction, got {self.prediction_type!r}")


@dataclass
class TrackConfig:
    """Experiment tracking with MLflow (``track/mlflow.py``), into ``MLFLOW_TRACKING_URI`` or else
    ``sqlite:///mlflow.db`` in the working directory. ``LORAKIT_TRACK=0`` in the environment turns it off for
    every run (a test suite, CI). A resumed run may change these: they do not alter the weights."""

    enabled: bool = _opt(True, "record the run in MLflow: params, tags, step metrics, the adapter (see "
                         "MLFLOW_TRACKING_URI)", flag="--track")
    experiment: str = _opt("lorakit", "MLflow experiment name")
    run_name: str = _opt("", "MLflow run name (default: the --output folder's name)")
    parent_run_id: str = _opt("", "nest this run under that MLflow run (a sweep's trials), in its experiment")


@dataclass
class RunConfig:
    """The whole tree; ``OUTPUT/config.yaml`` holds it resolved. A YAML file may also hold the top-level keys
    in ``OTHER_KEYS``: read by another command (``sweep:``, ``lorakit sweep``'s search space, track/space.py),
    passed over by ``load_config``, so one file serves ``lorakit train`` and ``lorakit sweep``."""

    OTHER_KEYS: typing.ClassVar[tuple[str, ...]] = ("sweep",)

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


@dataclass
class ServeConfig:
    """``lorakit serve``: one base model, many adapters, an OpenAI-compatible HTTP endpoint."""

    adapters: list[str] = _opt([], "NAME=DIR: serve the PEFT adapter in DIR as model NAME (repeat the flag)",
                               flag="--adapter", repeat=True)
    adapter_dir: str = _opt("", "folder POST /v1/adapters may load from (paths inside it only); unset: no "
                            "runtime loading")
    host: str = _opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network (set an API key)")
    port: int = _opt(8000, "TCP port", valid=Range(1, 65535))
    api_key: str = _opt("", "require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: the LORAKIT_API_KEY environment variable)")
    served_model_name: str = _opt("", "the base model's id in the API (default: the --model value)")
    max_batch: int = _opt(32, "requests decoded together in one forward", valid=AT_LEAST_ONE)
    max_adapters: int = _opt(32, "adapters held in memory; beyond it the least recently used one is unloaded "
                             "and reloaded on demand", valid=AT_LEAST_ONE)
    max_queue: int = _opt(256, "requests waiting beyond the free batch slots; more get 429 with Retry-After",
                          valid=AT_LEAST_ONE)
    max_tokens_limit: int = _opt(4096, "the largest max_tokens a request may ask for", valid=AT_LEAST_ONE)
    threads: int = _opt(0, "torch CPU threads (0: the cores this process may use)", valid=NON_NEGATIVE)

    def __post_init__(self) -> None:
        self.adapters = [a.strip() for item in self.adapters for a in item.split(",") if a.strip()]
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise LorakitError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter sql=runs/sql")
        check_ranges(self, "serve")


@dataclass
class ServeRunConfig:
    """What ``lorakit serve`` reads: the base model (its model section) and the server options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


OBJECTIVES = {"eval_loss": "minimize", "eval_ppl": "minimize", "eval_accuracy": "maximize",
              "eval_exact_match": "maximize", "eval_f1": "maximize"}  # what an eval record holds; the usual way


@dataclass
class SweepConfig:
    """``lorakit sweep``: the study's own options (the trials' fixed part is a RunConfig; its space, a config
    file's ``sweep:`` key, track/space.py)."""

    trials: int = _opt(20, "finished (complete or pruned) trials the study should hold; those already in it "
                       "count, so rerunning the command resumes a sweep", valid=AT_LEAST_ONE)
    storage: str = _opt("", "Optuna storage: an RDB URL (postgresql://, mysql://, sqlite:///) shared by workers on "
                        "many machines, or a journal file path (default: OUTPUT/study.journal)")
    study_name: str = _opt("", "the study in --storage (default: the --output folder's name)")
    n_jobs: int = _opt(1, "worker processes on this machine, sharing the study", valid=AT_LEAST_ONE)
    timeout: float = _opt(0.0, "stop starting trials after this many seconds (0: no limit)", valid=NON_NEGATIVE)
    objective: str = _opt("eval_loss", f"the eval metric to optimize: {', '.join(OBJECTIVES)} (eval_exact_match "
                          "and eval_f1 need --eval-generate)")
    direction: str = _opt("", "minimize or maximize (default: the objective's usual one)")

    def __post_init__(self) -> None:
        check_ranges(self, "sweep")
        if self.objective not in OBJECTIVES:
            raise LorakitError(f"--objective {self.objective!r}: not an eval metric; choose one of "
                               f"{', '.join(OBJECTIVES)}")
        if self.direction not in ("", "minimize", "maximize"):
            raise LorakitError(f"--direction must be minimize or maximize, got {self.direction!r}")
        self.direction = self.direction or OBJECTIVES[self.objective]


@dataclass
class SweepRunConfig:
    """What ``lorakit sweep`` reads besides the trials' RunConfig: its own flags."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


# --- generic machinery: flags, YAML, validation -------------------------------------------------


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _sections(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _leaf_fields(root: type = RunConfig) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """flag name (without dashes) -> (section, field, type)."""
    out = {}
    for section, scls in _sections(root):
        hints = typing.get_type_hints(scls)
        for f in dataclasses.fields(scls):
            out[_flag(f)[2:]] = (section, f, hints[f.name])
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field type ``tp``; strings from the CLI are parsed."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, str) and str in args and "," not in value:
            return value
        for a in args:
            if a is str:
                continue
            try:
                return _coerce(value, a, where)
            except LorakitError:
                pass
        if str in args and isinstance(value, str):
            return value
        raise LorakitError(f"{where}: expected {tp}, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise LorakitError(f"{where}: expected a list of strings, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise LorakitError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise LorakitError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise LorakitError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LorakitError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise LorakitError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LorakitError(f"{where}: expected a string, got {value!r}")
    return value


def range_problem(f: dataclasses.Field, value: Any) -> str | None:
    """``"-0.001: must be > 0"`` when ``value`` is outside the field's declared range, else None."""
    valid = f.metadata.get("valid")
    if valid is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r}: must be a finite number {valid}"
    return None if value in valid else f"{value:g}: must be {valid}"


def check_ranges(section: Any, name: str) -> None:
    """Every numeric field of a section dataclass within its declared range (``_opt(valid=...)``)."""
    for f in dataclasses.fields(section):
        problem = range_problem(f, getattr(section, f.name))
        if problem:
            raise LorakitError(f"{_flag(f)} ({name}.{f.name}) {problem}")


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: X)`` for the help text, from the dataclass default; empty where there is none to show."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default in ("", [], {}, None) or default is dataclasses.MISSING:
        return ""
    if isinstance(default, bool):
        text = str(default).lower()
    elif isinstance(default, float):
        text = f"{default:g}"
    else:
        text = str(default)
    return f" (default: {text})"


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None,
                     root: type = RunConfig, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per config field of ``root`` (all sections, or the named ones; not the flags in
    ``exclude``); a bool field gets ``--name`` and ``--no-name``, so either way a YAML value can be
    overridden. Defaults are None so that only flags the user typed override the YAML."""
    for name, (section, f, tp) in _leaf_fields(root).items():
        if (sections is not None and section not in sections) or name in exclude:
            continue
        help = (f.metadata.get("help", "") + _default_text(f)).replace("%", "%%")  # argparse %-formats help
        flags = ["--" + name, *f.metadata.get("aliases", ())]
        if tp is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.metadata.get("repeat"):
            parser.add_argument(*flags, dest=name, action="append", default=None,
                                metavar=name.upper().replace("-", "_"), help=help)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper().replace("-", "_"), help=help)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    try:
        return cls(**values)
    except TypeError as e:  # unknown keys are caught earlier; this is a safety net
        raise LorakitError(f"{where}: {e}") from None


# What transformers' TrainingArguments, PEFT's LoraConfig and TRL call some options: suggested, not accepted.
ALIASES = {"learning_rate": "lr", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_r": "r", "rank": "r",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "max_seq_length": "seq_len", "max_length": "seq_len",
           "model_name_or_path": "model", "output_dir": "output", "lr_scheduler_type": "schedule",
           "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
           "save_total_limit": "keep_last", "train_file": "data", "dataset": "data", "use_rslora": "rslora"}


def _did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known`` to ``key`` (or to a misspelt alias), else ``""``."""
    aliases = {alias: name for alias, name in ALIASES.items() if name in known}
    close = difflib.get_close_matches(key, known + list(aliases), n=1, cutoff=0.6)
    return f" (did you mean {aliases.get(close[0], close[0])}?)" if close else ""


def _did_you_mean_in(key: str, section: str, sections: dict[str, type]) -> str:
    """The section where this exact name (or alias) lives, else a close match among ``section``'s fields."""
    name = ALIASES.get(key, key)
    owner = next((s for s, cls in sections.items() if name in {f.name for f in dataclasses.fields(cls)}), None)
    if owner:
        return f" (did you mean {owner}.{name}?)"
    return _did_you_mean(key, [f.name for f in dataclasses.fields(sections[section])])


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of each top-level key and each key one level down: ``{("train", "lr"): 4}``."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(key.value,)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    lines[(key.value, sub.value)] = sub.start_mark.line + 1
    return lines


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                root: type = RunConfig) -> Any:
    """YAML file (optional) + flag overrides (``{"lr": "1e-4"}``, ``None`` = not given) -> ``root`` (RunConfig,
    or ServeRunConfig for ``lorakit serve``). Every problem (unknown keys with their close matches, wrong
    types, values out of range) is reported in one LorakitError, not only the first."""
    leaves = _leaf_fields(root)
    by_section: dict[str, dict[str, Any]] = {s: {} for s, _ in _sections(root)}
    sections = dict(_sections(root))
    problems: list[str] = []

    def put(section: str, f: dataclasses.Field, tp: Any, value: Any, where: str) -> None:
        try:
            value = _coerce(value, tp, where)
        except LorakitError as e:
            problems.append(str(e))
            return
        problem = range_problem(f, value)
        if problem:
            problems.append(f"{where} {problem}")
        else:
            by_section[section][f.name] = value

    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
            raw = yaml.safe_load(text) or {}
        except FileNotFoundError:
            raise LorakitError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise LorakitError(f"{p}:{(line or 0) + 1}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise LorakitError(f"{p}: expected a mapping of config keys at top level")
        lines = key_lines(text)
        flat = [name.replace("-", "_") for name in leaves] + list(sections)
        for key, value in raw.items():
            at = f"{p}:{lines.get((str(key),), 1)}"
            if key in sections and isinstance(value, dict):
                names = {f.name: f for f in dataclasses.fields(sections[key])}
                hints = typing.get_type_hints(sections[key])
                for k, v in value.items():
                    sub_at = f"{p}:{lines.get((str(key), str(k)), 1)}"
                    if k not in names:
                        problems.append(f"{sub_at}: unknown key {key}.{k}{_did_you_mean_in(str(k), key, sections)}")
                        continue
                    put(key, names[k], hints[k], v, f"{sub_at}: {key}.{k}")
            elif key in getattr(root, "OTHER_KEYS", ()):
                continue
            elif str(key).replace("_", "-") in leaves:
                section, f, tp = leaves[str(key).replace("_", "-")]
                put(section, f, tp, value, f"{at}: {key}")
            else:
                problems.append(f"{at}: unknown key {key!r}{_did_you_mean(str(key), flat)}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        key = key.replace("_", "-")
        if key not in leaves:
            problems.append(f"unknown option --{key}")
            continue
        section, f, tp = leaves[key]
        put(section, f, tp, value, f"--{key}")
    built = {}
    if not problems:
        for name, cls in sections.items():
            try:
                built[name] = _build(cls, by_section[name], name)
            except LorakitError as e:
                problems.append(str(e))
    if problems:
        raise LorakitError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    return root(**built)


def replace_options(cfg: Any, values: dict[str, Any]) -> Any:
    """``cfg`` with options replaced by flag name (``{"lr": 1e-3, "r": 8}``), each checked as a flag would be
    (type, declared range, the section's own checks)."""
    leaves = _leaf_fields(type(cfg))
    changes: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        key = name.replace("_", "-")
        if key not in leaves:
            raise LorakitError(f"unknown option --{key}{_did_you_mean(key, list(leaves))}")
        section, f, tp = leaves[key]
        value = _coerce(value, tp, f"--{key}")
        problem = range_problem(f, value)
        if problem:
            raise LorakitError(f"--{key} {problem}")
        changes.setdefault(section, {})[f.name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()})


def option_field(name: str, root: type = RunConfig) -> tuple[str, dataclasses.Field, Any] | None:
    """(section, field, type) of the option whose flag is ``--name`` (``weight_decay`` or ``weight-decay``)."""
    return _leaf_fields(root).get(name.replace("_", "-"))


def option_names(root: type = RunConfig) -> list[str]:
    """Every option's flag name without dashes (``lr``, ``weight-decay``, ...)."""
    return list(_leaf_fields(root))


def parse_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type ``tp`` as a flag's or YAML value is (CLI strings parsed)."""
    return _coerce(value, tp, where)


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known`` to ``key``, else ``""``."""
    return _did_you_mean(key, known)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
