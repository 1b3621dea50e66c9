"""Parity: run exported files in their own runtime and compare with PyTorch on the same token ids.

For each prompt PyTorch (fp32, the adapter on at its scale) gives the greedy continuation R (up to
``MAX_NEW_TOKENS``, ending at eos) and the logits that chose each token of R. The runtime then
  - decodes greedily on its own from the prompt: the sequence must equal R (expected for f32/f16; a
    quantized export may differ, so there it is reported, not required);
  - is fed prompt + R (teacher forcing): top-1 agreement with R at every position, and the largest
    |logit difference| from PyTorch's logits (both runtimes expose logits).
The prompts are the run's validation data rendered as training rendered them (``--prompts FILE``
overrides), encoded once by the Hugging Face tokenizer: this compares the models; the GGUF tokenizer
is checked separately (``lorakit.export.gguf.choose_pretokenizer``).
"""

from __future__ import annotations

import ctypes
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.device import cpu_threads
from lorakit.errors import LorakitError
from lorakit.export import ExportJob

MAX_PROMPTS = 8
MAX_NEW_TOKENS = 24
# Below this many parameters the check runs on one thread: a small model gains little from more, and on a
# busy machine threads that spin-wait for each other are far slower (measured here under load ~10 on 2
# cores, the bundled 4.2M model in llama.cpp: 1 thread 0.6 s, 2 threads 7.5-16.6 s for the same work).
ONE_THREAD_BELOW = 300_000_000

RUNTIMES = {  # name -> (import name, install command)
    "llama.cpp": ("llama_cpp", 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python>=0.3.16,<0.4" '
                  "(or pip install 'lorakit[export]'; it compiles llama.cpp, ~6 min on 2 cores)"),
    "onnxruntime-genai": ("onnxruntime_genai", "pip install onnxruntime-genai onnxruntime onnx-ir "
                          "(or pip install 'lorakit[export]')"),
}


def runtime_missing(runtime: str) -> str | None:
    """None when ``runtime`` can be imported, else a line naming it and its install command."""
    module, install = RUNTIMES[runtime]
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{runtime} is not installed: {install}"
    return None


# --- prompts and the PyTorch reference ------------------------------------------------------------------


def parity_prompts(job: ExportJob, tokenizer: Any) -> list[str]:
    """Up to ``MAX_PROMPTS`` prompt texts: ``--prompts FILE`` (JSON/JSONL records, rendered as training renders
    them, or plain text, one prompt per line), else the first adapter's validation data (its run's
    config.yaml), else a few generic texts."""
    from lorakit.merging import CHECK_PROMPTS

    if job.prompts:
        return _file_prompts(Path(job.prompts), tokenizer)
    for a in job.adapters:
        data = _run_data(a.path)
        if data:
            return _file_prompts(Path(data), tokenizer)
    return list(CHECK_PROMPTS)


def _run_data(adapter: Path) -> str | None:
    """The validation (else training) data file of the run that wrote ``adapter``, if it still exists."""
    cfg_file = adapter / "config.yaml"
    if not cfg_file.is_file():
        return None
    from lorakit.config import load_config

    data = load_config(cfg_file).data
    for f in (data.val, data.train):
        if f and Path(f).is_file():
            return f
    return None


def run_data_format(adapter: Path) -> str | None:
    """How the run that wrote ``adapter`` rendered its examples (alpaca, chat, ...), if known."""
    data = _run_data(adapter)
    if data is None:
        return None
    from lorakit.data.tokenize import valid_records

    try:
        return valid_records(data, "auto", 1)[1]
    except LorakitError:
        return None


def _file_prompts(path: Path, tokenizer: Any) -> list[str]:
    from lorakit.evaluate import prompts_and_references

    if path.suffix.lower() in (".json", ".jsonl"):
        from lorakit.data.tokenize import valid_records

        records, fmt = valid_records(path, "auto", MAX_PROMPTS)
        if fmt == "text":
            return [r["text"] for r in records]
        return [p for p, _ in prompts_and_references(records, fmt, tokenizer)]
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise LorakitError(f"--prompts {path}: no prompts (JSON/JSONL records, or one prompt per line)")
    return lines[:MAX_PROMPTS]


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]          # PyTorch's greedy continuation, ending with eos if it stopped there
    logits: np.ndarray         # (len(tokens), V): the logits that chose each token


def parity_threads(source: Any) -> int:
    n = sum(p.numel() for p in source.model.parameters())
    return 1 if n < ONE_THREAD_BELOW else cpu_threads()


def eos_ids(source: Any) -> set[int]:
    ids = getattr(getattr(source.model, "generation_config", None), "eos_token_id", None)
    ids = {ids} if isinstance(ids, int) else set(ids or [])
    if source.tokenizer.eos_token_id is not None:
        ids.add(source.tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def references(source: Any, prompts: list[str], adapter: str | None, scale: float = 1.0) -> list[Reference]:
    """PyTorch's greedy continuations of ``prompts`` with ``adapter`` at ``scale`` (None: the base alone)."""
    from lorakit.data.tokenize import pad_token_id
    from lorakit.generate import encode_prompt

    model = source.use(adapter, scale)
    eos, pad = sorted(eos_ids(source)), pad_token_id(source.tokenizer)
    context = source.config.max_position_embeddings
    threads = torch.get_num_threads()
    torch.set_num_threads(parity_threads(source))
    out = []
    try:
        for text in prompts:
            ids = encode_prompt(source.tokenizer, text)
            room = min(MAX_NEW_TOKENS, context - len(ids) - 1)
            if room < 1:
                raise LorakitError(f"a parity prompt of {len(ids)} tokens leaves no room in the model's context of "
                                   f"{context}; pass shorter --prompts")
            x = torch.tensor([ids])
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=room,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad, output_logits=True,
                                 return_dict_in_generate=True)
            tokens = gen.sequences[0, len(ids):].tolist()
            logits = torch.cat([step.float() for step in gen.logits])[: len(tokens)].numpy()  # (new, V)
            out.append(Reference(ids, tokens, logits))
    finally:
        torch.set_num_threads(threads)
        source.use(None)
    return out


# --- runtimes -------------------------------------------------------------------------------------------


def quiet_llama() -> Any:
    """Silence llama.cpp's own stderr logging (its warnings print whatever llama-cpp-python's verbose says)."""
    from llama_cpp._utils import suppress_stdout_stderr

    return suppress_stdout_stderr(disable=False)


class LlamaCpp:
    """A GGUF in llama.cpp (llama-cpp-python) with LoRA GGUFs loaded beside it, switched with ``use``."""

    def __init__(self, base: Path, loras: list[Path], n_ctx: int, threads: int | None = None):
        from llama_cpp import Llama
        from llama_cpp import llama_cpp as C

        self.C = C
        self.llm = Llama(model_path=str(base), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads or cpu_threads(),
                         n_threads_batch=threads or cpu_threads(), logits_all=True, verbose=False)
        self.loras = {}
        for p in loras:
            with quiet_llama():  # llama.cpp warns, per tensor, that a LoRA of a repacked (q4_0) weight stays on CPU
                handle = C.llama_adapter_lora_init(self.llm._model.model, str(p).encode())
            if not handle:
                raise LorakitError(f"{p}: llama.cpp could not load this LoRA GGUF for {base}")
            self.loras[p] = handle

    def use(self, lora: Path | None, scale: float = 1.0) -> None:
        if lora is None:
            rc = self.C.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            adapters = (self.C.llama_adapter_lora_p_ctypes * 1)(self.loras[lora])
            rc = self.C.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale))
        if rc:
            raise LorakitError(f"llama.cpp refused the LoRA {lora}")
        self.llm.reset()

    def forced(self, prompt: list[int], tokens: list[int]) -> np.ndarray:
        """(len(tokens), V) logits predicting each of ``tokens`` after ``prompt``."""
        self.llm.reset()
        self.llm.eval(prompt + tokens[:-1])
        return np.array(self.llm.scores[len(prompt) - 1: len(prompt) - 1 + len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        while len(out) < max_new:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in eos:
                break
            self.llm.eval([token])
        return out

    def close(self) -> None:
        for handle in self.loras.values():
            self.C.llama_adapter_lora_free(handle)
        self.loras.clear()
        self.llm.close()


def llama_cpp_tokenizer(path: Path) -> Callable[[str], list[int]]:
    """llama.cpp's tokenizer from a (vocabulary-only) GGUF: text -> ids, special tokens parsed, no bos.
    RuntimeError when llama.cpp refuses the file (e.g. a pre-tokenizer name it does not know)."""
    from llama_cpp import Llama

    try:
        with quiet_llama():  # llama.cpp warns that a vocabulary-only file has no context length
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    return lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


class OrtGenai:
    """An onnxruntime-genai model folder with its ``.onnx_adapter`` files loaded, switched with ``use``."""

    def __init__(self, folder: Path, adapters: dict[str, Path], threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads or cpu_threads()}}}}))
        self.model = og.Model(config)
        self.adapters = og.Adapters(self.model)
        for name, path in adapters.items():
            self.adapters.load(str(path), name)
        self.active: str | None = None

    def use(self, name: str | None, scale: float = 1.0) -> None:
        if scale != 1.0:
            raise LorakitError("onnxruntime-genai applies an adapter as written (scale 1)")
        self.active = name

    def _generator(self, max_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        gen = self.og.Generator(self.model, params)
        if self.active:
            gen.set_active_adapter(self.adapters, self.active)
        return gen

    def forced(self, prompt: list[int], tokens: list[int]) -> np.ndarray:
        gen = self._generator(len(prompt) + len(tokens) + 1)
        gen.append_tokens(prompt)
        rows = [np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)]
        for t in tokens[:-1]:
            gen.append_tokens([t])
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
        return np.stack(rows)

    def greedy(self, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
        gen = self._generator(len(prompt) + max_new)
        gen.append_tokens(prompt)
        out: list[int] = []
        while len(out) < max_new and not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            out.append(token)
            if token in eos:
                break
        return out


# --- comparing ----------------------------------------------------------------------------------------


@dataclass
class Check:
    label: str
    sequences_equal: int = 0
    near_ties: int = 0        # sequences that diverged where PyTorch's top two were within the measured difference
    sequences: int = 0
    agreeing: int = 0
    positions: int = 0
    max_logit_diff: float = 0.0

    @property
    def agreement(self) -> float:
        return self.agreeing / self.positions if self.positions else 1.0

    @property
    def equal(self) -> bool:
        return self.sequences_equal + self.near_ties == self.sequences

    def line(self) -> str:
        ties = f" (+{self.near_ties} diverging at a near-tie)" if self.near_ties else ""
        return (f"{self.label:<28} greedy {self.sequences_equal}/{self.sequences} sequences equal{ties}, top-1 "
                f"agreement {100 * self.agreement:.1f}% of {self.positions} tokens, max |logit diff| "
                f"{self.max_logit_diff:.2g}")


def compare(runtime: Any, refs: list[Reference], eos: set[int], label: str) -> Check:
    """Both checks of the module docstring over ``refs``. A greedy sequence that leaves PyTorch's at a position
    where PyTorch's two candidates are closer than twice the logit difference measured there is a near-tie:
    a coin toss at that precision, counted apart from real mismatches."""
    check = Check(label)
    for ref in refs:
        forced = runtime.forced(ref.prompt, ref.tokens)  # (len(tokens), V)
        diffs = np.abs(forced - ref.logits).max(-1)
        check.agreeing += int((forced.argmax(-1) == np.array(ref.tokens)).sum())
        check.positions += len(ref.tokens)
        check.max_logit_diff = max(check.max_logit_diff, float(diffs.max()))
        own = runtime.greedy(ref.prompt, len(ref.tokens), eos)
        check.sequences += 1
        if own == ref.tokens:
            check.sequences_equal += 1
            continue
        j = next((i for i, (a, b) in enumerate(zip(own, ref.tokens, strict=False)) if a != b), None)
        if j is not None:
            margin = ref.logits[j][ref.tokens[j]] - ref.logits[j][own[j]]
            check.near_ties += int(margin <= 2 * diffs[j])
    return check


@dataclass
class Report:
    runtime: str
    what: str                       # "GGUF f16", "ONNX fp32", ...
    exact: bool                     # greedy tokens must be equal (f32/f16)
    prompts: int = 0
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # e.g. the tokenizer check failed
    skipped: str | None = None      # the runtime is missing: its install line

    @property
    def ran(self) -> bool:
        return self.skipped is None

    @property
    def ok(self) -> bool:
        exact = all(c.equal for c in self.checks) if self.exact else True
        return self.ran and not self.problems and exact

    def summary(self) -> str:
        if not self.ran:
            return f"parity: not checked: {self.skipped}"
        head = (f"parity: {self.runtime} ({self.what}) vs PyTorch (fp32), {self.prompts} prompts, up to "
                f"{MAX_NEW_TOKENS} new tokens, same token ids in both:")
        lines = [head, *[f"  {c.line()}" for c in self.checks], *[f"  {p}" for p in self.problems]]
        if self.ok:
            verdict = "OK" if self.exact else "reported (quantized: greedy tokens may differ)"
        else:
            verdict = "MISMATCH: the exported files do not reproduce PyTorch"
        return "\n".join([*lines, f"  -> {verdict}"])


@dataclass
class GgufTarget:
    base: Path
    loras: list[Path]
    adapter: str | None   # the adapter the PyTorch reference runs (None: the base alone)
    label: str


@dataclass
class OnnxTarget:
    folder: Path
    adapter: Path | None  # the .onnx_adapter switched on (None: no adapter active)
    name: str | None      # the adapter the PyTorch reference runs
    label: str


def _n_ctx(source: Any, prompts: list[str]) -> int:
    from lorakit.generate import encode_prompt

    longest = max(len(encode_prompt(source.tokenizer, p)) for p in prompts)
    return min(source.config.max_position_embeddings, longest + MAX_NEW_TOKENS + 8)


def gguf_check(source: Any, targets: list[GgufTarget], prompts: list[str], exact: bool, kind: str,
               problems: list[str] | None = None) -> Report:
    report = Report("llama.cpp", f"GGUF {kind}", exact, len(prompts), problems=list(problems or []))
    missing = runtime_missing("llama.cpp")
    if missing:
        report.skipped = missing
        return report
    eos = eos_ids(source)
    runners: dict[Path, LlamaCpp] = {}
    try:
        for t in targets:
            loras = sorted({p for u in targets if u.base == t.base for p in u.loras})
            runner = runners.get(t.base) or runners.setdefault(
                t.base, LlamaCpp(t.base, loras, _n_ctx(source, prompts), parity_threads(source)))
            runner.use(t.loras[0] if t.loras else None)
            refs = references(source, prompts, t.adapter)
            report.checks.append(compare(runner, refs, eos, t.label))
    finally:
        for r in runners.values():
            r.close()
    return report


def onnx_check(source: Any, targets: list[OnnxTarget], prompts: list[str], exact: bool, precision: str) -> Report:
    report = Report("onnxruntime-genai", f"ONNX {precision}", exact, len(prompts))
    missing = runtime_missing("onnxruntime-genai")
    if missing:
        report.skipped = missing
        return report
    eos = eos_ids(source)
    runner = OrtGenai(targets[0].folder, {t.name: t.adapter for t in targets if t.adapter and t.name},
                      parity_threads(source))
    for t in targets:
        runner.use(t.name if t.adapter else None)
        refs = references(source, prompts, t.name)
        report.checks.append(compare(runner, refs, eos, t.label))
    return report
