"""`lorakit export`: adapters (and their base) in the formats edge runtimes load, each checked in its runtime.

    lorakit export --adapter RUN [--adapter RUN2] [--model BASE] --format gguf|onnx|merged --output DIR
                   [--dtype f32|f16|bf16] [--quantize q8_0|q4_0|int4|int8] [--merge] [--prompts FILE] [--strict]

A format is one module with ``export(job) -> Exported`` plus one line in ``FORMATS``: the flags it takes are
checked here, once, so every format refuses the same way. Everything is written into a hidden folder beside
``--output`` and renamed into place at the end: a failed export leaves nothing half-written. Then the
format's parity check runs the written files in their own runtime against PyTorch (``lorakit.export.parity``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

__all__ = ["FORMATS", "AdapterSource", "ExportJob", "Exported", "Format", "Written", "export", "export_command"]


@dataclass(frozen=True)
class Format:
    """One export format: its module (which defines ``export(job) -> Exported``) and the flags it accepts."""

    module: str
    help: str
    dtypes: tuple[str, ...]
    default_dtype: str
    quantize: tuple[str, ...] = ()
    merge: bool = True          # accepts --merge (bake one adapter in)
    several: bool = True        # accepts several --adapter at once
    text_to_image: bool = False  # reads text-to-image adapters (diffusers' layout), not PEFT language-model ones


FORMATS: dict[str, Format] = {
    "gguf": Format("lorakit.export.gguf", "llama.cpp / Ollama / LM Studio: base GGUF + one LoRA GGUF per adapter "
                   "(or --merge: one merged GGUF) + an Ollama Modelfile", ("f32", "f16", "bf16"), "f16",
                   ("q8_0", "q4_0")),
    "onnx": Format("lorakit.export.onnx", "ONNX Runtime GenAI: one model folder whose LoRA weights are inputs + one "
                   ".onnx_adapter per adapter (or --merge: one adapter baked in)", ("f32",), "f32", ("int4", "int8")),
    "merged": Format("lorakit.export.merged", "a plain Hugging Face model folder with the adapter folded in "
                     "(lorakit merge)", ("f32", "f16", "bf16"), "f32", (), merge=False, several=False),
    "kohya": Format("lorakit.export.kohya", "A1111 / ComfyUI / Forge: a text-to-image adapter in kohya's key layout "
                    "(lora_unet_..., .alpha), one .safetensors per adapter", ("f32", "f16", "bf16"), "f32", (),
                    merge=False, text_to_image=True),
}


@dataclass(frozen=True)
class AdapterSource:
    """One ``--adapter``: a PEFT folder (a ``lorakit train`` run) and the name its exported files carry."""

    path: Path
    name: str


@dataclass
class ExportJob:
    adapters: list[AdapterSource]
    model: str | None            # --model: the base (default: the one the adapters were trained on)
    format: str
    output: Path                 # the final folder
    dtype: str
    quantize: str | None = None
    merge: bool = False
    prompts: str | None = None   # --prompts FILE for the parity check
    strict: bool = False
    workdir: Path = field(default=Path())  # the hidden folder the format writes into (renamed to output)


@dataclass
class Written:
    """A file the export wrote (its path under the output folder) and what it is."""

    path: Path
    what: str
    kind: str = "other"          # "base", "adapter", "merged" or "other": the adapter fraction uses these

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else _folder_size(self.path)


@dataclass
class Exported:
    written: list[Written]
    notes: list[str] = field(default_factory=list)
    check: Callable[[Path], Any] | None = None  # (output folder) -> parity.Report, run after the rename
    base_bytes: int | None = None                # the base's size when it is not among the written files


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def adapter_sources(paths: list[str]) -> list[AdapterSource]:
    """``--adapter`` values (each may be a comma list) -> sources with unique names from their folders."""
    flat = [p for value in paths for p in value.split(",") if p.strip()]
    out: list[AdapterSource] = []
    seen: set[str] = set()
    for p in flat:
        path = Path(p.strip()).expanduser()
        if not (path / "adapter_config.json").is_file():
            if (path / "config.json").is_file():
                raise LorakitError(f"--adapter {p}: a full model folder, not an adapter; export it with --model {p} "
                                   "--format ... and no --adapter is not supported yet: pass an adapter folder")
            raise LorakitError(f"--adapter {p}: no adapter_config.json there (give a lorakit train output or a "
                               "PEFT adapter folder)")
        name = path.resolve().name or "adapter"
        base, i = name, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        seen.add(name)
        out.append(AdapterSource(path.resolve(), name))
    if not out:
        raise LorakitError("--adapter is required: the adapter folder(s) to export")
    return out


def check_job(job: ExportJob) -> Format:
    """The job's format, after every flag is checked against it: one line per problem, nothing written."""
    fmt = FORMATS.get(job.format)
    if fmt is None:
        raise LorakitError(f"--format {job.format!r}: choose one of {', '.join(FORMATS)}")
    if job.dtype not in fmt.dtypes:
        raise LorakitError(f"--dtype {job.dtype}: --format {job.format} writes {', '.join(fmt.dtypes)}")
    if job.quantize and job.quantize not in fmt.quantize:
        allowed = ", ".join(fmt.quantize) if fmt.quantize else "no quantization"
        raise LorakitError(f"--quantize {job.quantize}: --format {job.format} takes {allowed}")
    if job.merge and not fmt.merge:
        raise LorakitError(f"--merge: --format {job.format} always merges; drop the flag")
    if len(job.adapters) > 1 and (job.merge or not fmt.several):
        what = "--merge bakes in one adapter" if job.merge else f"--format {job.format} takes one adapter"
        raise LorakitError(f"--adapter given {len(job.adapters)} times: {what}; export them one at a time")
    if job.prompts and not Path(job.prompts).is_file():
        raise LorakitError(f"--prompts {job.prompts}: no such file")
    out = job.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorakitError(f"--output {out}: exists and is not empty; choose a new folder")
    for a in job.adapters:
        if fmt.text_to_image:
            from lorakit.diffusion.io import read_diffusers

            read_diffusers(a.path)  # refuses other layouts, pickles, broken files
        else:
            unsupported_adapter(a.path)
    return fmt


def unsupported_adapter(path: Path) -> None:
    """One line for adapter features no export format can express (before anything is loaded)."""
    from lorakit.lora.io import WEIGHTS_NAME, read_adapter

    if (path / "pytorch_lora_weights.safetensors").is_file() and not (path / WEIGHTS_NAME).is_file():
        raise LorakitError(f"--adapter {path}: a text-to-image adapter (diffusers' layout); export it with "
                           "--format kohya")
    config, _ = read_adapter(path)  # refuses DoRA, pickles, broken files
    if config.get("modules_to_save"):
        raise LorakitError(f"{path}/adapter_config.json: modules_to_save {config['modules_to_save']} holds whole "
                           "trained modules, which LoRA formats (GGUF LoRA, .onnx_adapter) cannot carry; export "
                           "with --format merged, or retrain without modules_to_save")
    if config.get("lora_bias"):
        raise LorakitError(f"{path}/adapter_config.json: lora_bias adapters are not supported by lorakit export")


def export(job: ExportJob) -> tuple[list[Written], object | None]:
    """Run ``job``: write its files into a hidden folder, rename it to ``job.output``, print each file with its
    size, then run and print the parity check. Returns (files, parity report or None)."""
    fmt = check_job(job)
    module = importlib.import_module(fmt.module)
    out = job.output
    out.parent.mkdir(parents=True, exist_ok=True)
    job.workdir = out.parent / f".tmp-{out.name}"
    shutil.rmtree(job.workdir, ignore_errors=True)
    job.workdir.mkdir()
    try:
        result: Exported = module.export(job)
        if out.exists():
            out.rmdir()
        os.replace(job.workdir, out)
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
    written = [Written(out / w.path.relative_to(job.workdir), w.what, w.kind) for w in result.written]
    _print_written(written, result.base_bytes)
    for note in result.notes:
        print(f"note: {note}")
    report = result.check(out) if result.check else None
    if report is not None:
        print(report.summary())
    return written, report


def _print_written(written: list[Written], base_bytes: int | None) -> None:
    base = base_bytes or next((w.size for w in written if w.kind in ("base", "merged")), None)
    width = max(len(str(w.path)) for w in written)
    for w in written:
        frac = f", {100 * w.size / base:.2f}% of the base" if w.kind == "adapter" and base else ""
        print(f"wrote {str(w.path):<{width}}  {human_size(w.size):>10}  {w.what}{frac}")


def export_command(adapters: list[str], model: str | None, format: str, output: str, dtype: str | None,
                   quantize: str | None, merge: bool, prompts: str | None, strict: bool) -> int:
    """What ``lorakit export`` runs; exit status 1 when ``--strict`` and parity failed or could not run."""
    if format not in FORMATS:
        raise LorakitError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    job = ExportJob(adapters=adapter_sources(adapters), model=model, format=format, output=Path(output),
                    dtype=dtype or FORMATS[format].default_dtype, quantize=quantize, merge=merge, prompts=prompts,
                    strict=strict)
    _, report = export(job)
    if strict and report is not None and not report.ok:
        print("lorakit: error: parity check failed (--strict)" if report.ran else
              "lorakit: error: parity check could not run (--strict): install the runtime named above",
              file=sys.stderr)
        return 1
    return 0
