"""Metrics a fine-tune is judged by: exact match of greedy answers on held-out examples, perplexity on a
text file (forgetting), and the base model against the same model with its adapter.

Prompts are rendered exactly as training rendered them (``lorakit.data.formats.to_segments``): the
prompt is every segment before the last response, the reference is that response as written in the
record. ``lorakit eval`` prints these metrics for a base model and, with ``--adapter``, for both.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.formats import CHAT_FORMATS, detect_file_format, read_records, reference_answer, to_segments
from lorakit.data.tokenize import IGNORE_INDEX, pad_token_id, tokenize_records, valid_records
from lorakit.errors import LorakitError
from lorakit.generate import chat_prompt, chat_stop, encode_prompt
from lorakit.lora import disable_adapters, lora_layers, set_adapter
from lorakit.train.causal_loss import evaluate as label_loss

__all__ = ["Prediction", "Report", "answer_scores", "compare_adapters", "compare_with_base", "contains_answer", "evaluate_model",
           "exact_match", "generate_answers", "knowledge", "load_eval_records", "load_knowledge", "perplexity",
           "predict", "prompts_and_references", "token_f1", "data_loss"]


@dataclass
class Prediction:
    prompt: str
    reference: str
    output: str

    @property
    def correct(self) -> bool:
        """Exact match after stripping surrounding whitespace (case and inner spacing count)."""
        return self.output.strip() == self.reference.strip()

    @property
    def f1(self) -> float:
        return token_f1(self.output, self.reference)


def _words(text: str) -> list[str]:
    """SQuAD's answer normalization (Rajpurkar et al. 2016, its official evaluation script): lower case, no
    punctuation, no articles (a, an, the), split on whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


_PUNCTUATION = frozenset(string.punctuation)


def token_f1(output: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of the precision and recall of the words ``output`` shares with
    ``reference`` (counted as multisets, after ``_words``); 1 when both have no words, 0 when one has none.
    An exact match scores 1; "forty two" against "The answer is forty two." scores 2·(1·0.5)/(1+0.5) = 2/3."""
    out, ref = _words(output), _words(reference)
    if not out or not ref:
        return float(out == ref)
    shared = sum((Counter(out) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(out), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: list[Prediction]) -> dict[str, float]:
    """``{"exact_match", "f1"}``: each the mean over ``predictions``."""
    n = max(len(predictions), 1)
    return {"exact_match": sum(p.correct for p in predictions) / n, "f1": sum(p.f1 for p in predictions) / n}


# --- examples -------------------------------------------------------------------------------------


def load_eval_records(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[list[dict], str]:
    """(the first ``limit`` records of a JSON/JSONL file, their format); every one is checked."""
    records, fmt = valid_records(path, fmt, limit)
    if fmt == "text":
        raise LorakitError(f"{path}: text records have no prompt to answer; give alpaca, chat or "
                           "prompt_completion records (or use --retain for perplexity on text)")
    return records, fmt


def _reference(record: dict, fmt: str) -> str:
    answer = reference_answer(record, fmt)
    if answer is not None:
        return answer
    raise LorakitError(f"format {fmt!r} has no answer to compare with; use alpaca, chat or prompt_completion")


def prompts_and_references(records: list[dict], fmt: str, tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt text as training rendered it, reference answer) per record; for a chat, the prompt is the
    conversation up to its last assistant turn (earlier answers included) and the reference is that turn."""
    out = []
    for record in records:
        segments = to_segments(record, fmt, tokenizer)
        last = max(i for i, (_, is_response) in enumerate(segments) if is_response)
        out.append(("".join(text for text, _ in segments[:last]), _reference(record, fmt)))
    return out


# --- generation and exact match ---------------------------------------------------------------------


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode with the KV cache on and no autograd; the previous mode is restored after."""
    training, use_cache = model.training, getattr(model.config, "use_cache", True)
    model.eval()
    model.config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        model.config.use_cache = use_cache


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's eos (one or a list) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_answers(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 64, stop: list[str] | None = None) -> list[str]:
    """Greedy continuation of each prompt, batched with left padding, each ending at eos or after
    ``max_new_tokens``; returns the new text without special tokens, cut before any ``stop`` string."""
    if max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad, eos = pad_token_id(tokenizer), _eos_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    # similar lengths share a batch: less padding; answers go back in the caller's order
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left-padded
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(rows):
                n = len(encoded[i])
                input_ids[row, width - n:] = torch.tensor(encoded[i])
                attention_mask[row, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=eos or None)  # (B, T + new)
            for row, i in enumerate(rows):
                new = out[row, width:].tolist()
                ends = [k for k, t in enumerate(new) if t in eos]
                text = tokenizer.decode(new[:ends[0]] if ends else new, skip_special_tokens=True)
                for s in stop or []:
                    text = text.split(s)[0]
                answers[i] = text
    return answers


def _default_max_new_tokens(tokenizer: Any, references: list[str]) -> int:
    """Room for the longest reference plus its eos and a little slack: a longer output cannot match."""
    return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 4


def predict(model: nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int | None = None,
            fmt: str = "auto", batch_size: int = 64) -> list[Prediction]:
    """Greedy answers to ``records`` (alpaca, chat or prompt_completion dicts) beside their references.
    ``max_new_tokens`` None: the longest reference's token count plus a margin."""
    if not records:
        raise LorakitError("no examples to evaluate")
    if fmt == "auto":
        fmt = detect_file_format(list(enumerate(records, 1)))
    pairs = prompts_and_references(records, fmt, tokenizer)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(tokenizer, [r for _, r in pairs])
    stop = chat_stop(tokenizer) if fmt in CHAT_FORMATS else None
    outputs = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, stop)
    return [Prediction(p, r, o) for (p, r), o in zip(pairs, outputs, strict=True)]


def exact_match(model: nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int | None = None,
                fmt: str = "auto", batch_size: int = 64) -> float:
    """Fraction of ``records`` whose greedy answer equals the reference (surrounding whitespace aside)."""
    predictions = predict(model, tokenizer, records, max_new_tokens, fmt, batch_size)
    return sum(p.correct for p in predictions) / len(predictions)


# --- knowledge kept: questions with known right answers ------------------------------------------------

KNOWLEDGE_TOKENS = 24  # an answer is judged on its first tokens: a right word deep in a ramble does not count


def load_knowledge(path: str | Path) -> list[dict[str, Any]]:
    """``{"question": str, "answers": [str, ...]}`` records of a JSON/JSONL file; the first bad one is raised
    as ``file:line: problem``."""
    items = []
    for line, record in read_records(path):
        question, answers = record.get("question"), record.get("answers")
        if not isinstance(question, str) or not question.strip():
            raise LorakitError(f"{path}:{line}: expected a non-empty string \"question\"")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise LorakitError(f"{path}:{line}: expected \"answers\": a list of the strings that count as right")
        items.append({"question": question, "answers": answers})
    if not items:
        raise LorakitError(f"{path}: no questions")
    return items


def contains_answer(output: str, answers: list[str]) -> bool:
    """Whether ``output`` contains one of ``answers`` as a whole word or phrase, ignoring case: "Paris" is in
    "Arr, the capital of France be Paris, matey!", "25" is not in "250" nor "0" in "-18.0"."""
    return any(re.search(rf"(?<![\w.]){re.escape(a.strip())}(?!\w|\.\d)", output, re.IGNORECASE) for a in answers)


def knowledge(model: nn.Module, tokenizer: Any, items: list[dict[str, Any]], max_new_tokens: int = KNOWLEDGE_TOKENS,
              batch_size: int = 64) -> tuple[float, list[dict[str, Any]]]:
    """(fraction answered right, per question {question, answers, output, correct}): each question asked as
    one chat turn (the tokenizer's chat template), answered greedily in at most ``max_new_tokens`` tokens.
    On questions the base answers right, a lower fraction after fine-tuning is forgetting."""
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": it["question"]}]) for it in items]
    outputs = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, chat_stop(tokenizer))
    rows = [{**it, "output": out, "correct": contains_answer(out, it["answers"])} for it, out in zip(items, outputs,
                                                                                                     strict=True)]
    return sum(r["correct"] for r in rows) / len(rows), rows


# --- perplexity ----------------------------------------------------------------------------------------


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """The tokenizer's prefix (bos) once, then the whole text; no warning about its length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = backend.encode(text, add_special_tokens=False).ids if backend is not None else \
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return encode_prompt(tokenizer, "") + ids


def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int, stride: int | None = None,
               batch_size: int = 8) -> float:
    """exp(token-weighted mean next-token NLL) of ``text`` in windows of ``seq_len`` tokens.

    Window k starts at token k·stride (default stride = seq_len: disjoint windows, so each window's
    first token goes unscored, as ``model(ids, labels=ids).loss`` on each window would score it). With a
    smaller stride every token after the first is scored exactly once, with up to seq_len - stride tokens
    of context from the previous window. In the model's dtype, no autocast.
    """
    stride = stride or seq_len
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise LorakitError(f"perplexity needs seq_len >= 2 and 1 <= stride <= seq_len, got {seq_len}, {stride}")
    ids = torch.tensor(_text_ids(tokenizer, text))  # (N,)
    if len(ids) < 2:
        raise LorakitError("the text is too short for perplexity: it needs at least one token to predict")
    # (begin, end, first scored target) per window; a target at t is predicted from position t - 1
    windows, scored_to = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids))
        windows.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == len(ids):
            break
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with _inference(model):
        for start in range(0, len(windows), batch_size):
            group = windows[start:start + batch_size]
            for length in sorted({end - begin for begin, end, _ in group}):  # one tensor per window length
                same = [w for w in group if w[1] - w[0] == length]
                batch = torch.stack([ids[b:e] for b, e, _ in same]).to(device)  # (B, T)
                logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V): position t predicts t+1
                targets = batch[:, 1:].clone()  # (B, T-1)
                for row, (b, _, first) in enumerate(same):
                    targets[row, :first - b - 1] = -100  # already scored by the previous window
                nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum").item()
                count += int((targets != -100).sum())
    return math.exp(nll / count)


# --- loss on the examples ------------------------------------------------------------------------------


def data_loss(model: nn.Module, tokenizer: Any, records: list[dict], fmt: str, seq_len: int,
              batch_size: int = 8) -> float:
    """Mean next-token loss over the reference answers' tokens of ``records``, tokenized (and truncated to
    ``seq_len``) as ``lorakit train`` does: the same number as a run's ``eval_loss`` on this file."""
    examples = [ex for ex in tokenize_records(records, fmt, tokenizer, seq_len)
                if any(t != IGNORE_INDEX for t in ex["labels"][1:])]
    if not examples:
        raise LorakitError(f"no example keeps an answer token within {seq_len} tokens; raise --seq-len")
    training = model.training
    try:
        return label_loss(model, examples, batch_size, pad_token_id(tokenizer), bf16=False)["eval_loss"]
    finally:
        model.train(training)


# --- a model's report, base vs adapters ---------------------------------------------------------------


@dataclass
class Report:
    """One model's metrics (None where not measured): exact match and token F1 of greedy answers, and the
    loss (and its perplexity) of the reference answers, on examples; perplexity on text (``--retain``). And
    the predictions behind the exact match."""

    exact_match: float | None = None
    f1: float | None = None
    data_loss: float | None = None
    perplexity: float | None = None
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def data_perplexity(self) -> float | None:
        return math.exp(min(self.data_loss, 700.0)) if self.data_loss is not None else None

    def to_dict(self, examples: int = 0) -> dict[str, Any]:
        """The metrics, and the first ``examples`` predictions as {prompt, reference, output, correct, f1}."""
        values = {"exact_match": self.exact_match, "f1": self.f1, "data_loss": self.data_loss,
                  "data_perplexity": self.data_perplexity, "perplexity": self.perplexity}
        out: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        if examples:
            out["examples"] = [{**asdict(p), "correct": p.correct, "f1": p.f1} for p in self.predictions[:examples]]
        return out


def evaluate_model(model: nn.Module, tokenizer: Any, records: list[dict] | None = None, text: str | None = None,
                   seq_len: int = 256, max_new_tokens: int | None = None, fmt: str = "auto",
                   batch_size: int = 64, loss: bool = False) -> Report:
    """Exact match and token F1 on ``records`` (with ``loss``, their reference answers' loss too) and
    perplexity on ``text``, for those given."""
    report = Report()
    if records:
        if fmt == "auto":
            fmt = detect_file_format(list(enumerate(records, 1)))
        report.predictions = predict(model, tokenizer, records, max_new_tokens, fmt, batch_size)
        scores = answer_scores(report.predictions)
        report.exact_match, report.f1 = scores["exact_match"], scores["f1"]
        if loss:
            report.data_loss = data_loss(model, tokenizer, records, fmt, seq_len)
    if text:
        report.perplexity = perplexity(model, tokenizer, text, seq_len)
    return report


def compare_with_base(model: nn.Module, tokenizer: Any, records: list[dict] | None = None, text: str | None = None,
                      seq_len: int = 256, max_new_tokens: int | None = None, fmt: str = "auto",
                      batch_size: int = 64, loss: bool = False) -> dict[str, Report]:
    """``{"base": report, "adapter": report}``: the base is the same model with its adapters disabled."""
    if not any(True for _ in lora_layers(model)):
        raise LorakitError("the model has no LoRA adapter to compare with its base")
    args = (records, text, seq_len, max_new_tokens, fmt, batch_size, loss)
    with disable_adapters(model):
        base = evaluate_model(model, tokenizer, *args)
    return {"base": base, "adapter": evaluate_model(model, tokenizer, *args)}


def compare_adapters(model: nn.Module, tokenizer: Any, adapters: dict[str, str], records: list[dict] | None = None,
                     text: str | None = None, seq_len: int = 256, max_new_tokens: int | None = None,
                     fmt: str = "auto", batch_size: int = 64, loss: bool = False) -> dict[str, Report]:
    """``{"base": report, name: report, ...}``: ``model`` holds every adapter of ``adapters`` ({name: folder},
    loaded under those names); each is evaluated alone, the base with none."""
    args = (records, text, seq_len, max_new_tokens, fmt, batch_size, loss)
    with disable_adapters(model):
        reports = {"base": evaluate_model(model, tokenizer, *args)}
    for name in adapters:
        set_adapter(model, [name])
        reports[name] = evaluate_model(model, tokenizer, *args)
    return reports


def _adapter_names(adapters: list[str]) -> dict[str, str]:
    """{name: folder}: "adapter" for one (as ``lorakit eval`` has always named it), else each folder's name,
    with its parents' names where two folders share one (``runs/a/out``, ``runs/b/out``: ``a/out``, ``b/out``)."""
    if len(adapters) == 1:
        return {"adapter": adapters[0]}
    parts = [Path(a).resolve().parts for a in adapters]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return dict(zip(names, adapters, strict=True))
    raise LorakitError(f"--adapter {adapters[0]} is given twice")


def _load_models(model: str | None, adapters: list[str]) -> tuple[nn.Module, Any, dict[str, str]]:
    """(the base in eval mode with every adapter loaded under its name, the tokenizer, {name: folder}). The
    base is ``--model``, else the one the first adapter was trained on (as trained: dtype, quantization);
    every adapter must share it."""
    from lorakit.lora import load_adapter
    from lorakit.model import load_model, load_tokenizer, model_config_for, resolve_model_path

    names = _adapter_names(adapters) if adapters else {}
    cfg = model_config_for(model, adapters[0] if adapters else None)
    for folder in adapters:
        if not (Path(folder) / "adapter_config.json").is_file() and (Path(folder) / "config.json").is_file():
            raise LorakitError(f"--adapter {folder}: a full model folder (from --method full), not an adapter; "
                               f"pass it as --model {folder}")
        trained = model_config_for(model, folder).name_or_path
        if trained != cfg.name_or_path:
            raise LorakitError(f"--adapter {folder}: trained on {trained}, but --adapter {adapters[0]} on "
                               f"{cfg.name_or_path}; compare adapters of one base, or give --model")
    tokenizer = load_tokenizer(resolve_model_path(cfg.name_or_path))
    m = load_model(cfg)
    for name, folder in names.items():
        load_adapter(m, folder, name=name)
    return m.eval(), tokenizer, names


def eval_command(model: str | None, adapters: list[str] | None, data: str | None, retain: str | None,
                 limit: int | None = None, max_new_tokens: int | None = None, seq_len: int | None = None,
                 show: int = 0, as_json: bool = False, report: str | None = None) -> int:
    """What ``lorakit eval`` runs: metrics for the base and for base + each adapter; ``show`` prints that
    many example answers too; ``report`` writes the report files there (``lorakit.track.report``)."""
    adapters = list(adapters or [])
    if not data and not retain:
        raise LorakitError("nothing to evaluate: give --data (exact match) and/or --retain (perplexity)")
    if limit is not None and limit < 1:
        raise LorakitError(f"--limit must be at least 1, got {limit}")
    if retain and not Path(retain).is_file():
        raise LorakitError(f"--retain {retain}: no such file")
    for folder in adapters:
        if not Path(folder).is_dir():
            raise LorakitError(f"--adapter {folder}: no such folder")
    if report:
        _check_report_folder(Path(report))
    records, fmt = load_eval_records(data, limit=limit) if data else (None, "auto")
    text = Path(retain).read_text(encoding="utf-8") if retain else None
    m, tokenizer, names = _load_models(model, adapters)
    seq_len = seq_len or min(getattr(m.config, "max_position_embeddings", None) or 1024, 1024)
    args = (records, text, seq_len, max_new_tokens, fmt)
    reports = compare_adapters(m, tokenizer, names, *args, loss=True)
    results = {name: r.to_dict(show) for name, r in reports.items()}
    if as_json:
        print(json.dumps(results))
    else:
        _print_table(results)
    measured = ([f"exact match, token F1 and loss over {len(records)} examples of {data}"] if records else []) + (
        [f"perplexity of {retain} in windows of {seq_len} tokens"] if text is not None else [])
    print("; ".join(measured), file=sys.stderr)
    if report:
        from lorakit.track.report import log_to_runs, write_report

        models = [{"name": name, "adapter": str(Path(names[name]).resolve()) if name in names else None,
                   **{k: v for k, v in values.items() if k != "examples"}} for name, values in results.items()]
        meta = {"data": data, "retain": retain, "examples": len(records) if records else 0, "seq_len": seq_len}
        files = write_report(Path(report), models, meta)
        print(f"report: {', '.join(str(f) for f in files)}", file=sys.stderr)
        for problem in log_to_runs(models, files):
            print(f"lorakit: warning: {problem}", file=sys.stderr)
    return 0


def _check_report_folder(out: Path) -> None:
    """Before any model is loaded: --report names a folder that can be written (made if missing)."""
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--report {out}: exists and is not a folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LorakitError("--report draws its charts with matplotlib: pip install matplotlib") from None


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    metrics = [k for k in ("exact_match", "f1", "data_loss", "data_perplexity", "perplexity") if k in results["base"]]
    width = max(10, *(len(name) + 2 for name in results))
    print(f"{'model':<{width}}" + "".join(f"{name:>16}" for name in metrics))
    for name, values in results.items():
        print(f"{name:<{width}}" + "".join(f"{_fmt(k, values[k]):>16}" for k in metrics))
    for name, values in results.items():
        for ex in values.get("examples", []):
            print(f"\n[{name}] {ex['prompt']!r}\n  reference: {ex['reference']!r}\n  output:    {ex['output']!r}")


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric in ("exact_match", "f1") else f"{value:.3f}"
