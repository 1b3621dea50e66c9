"""`lorakit data check`: find every bad record, then report on the data's quality, without training.

An *exact* duplicate repeats an earlier record's normalized prompt (everything but the answers).
A *near* duplicate has a Jaccard similarity >= 0.9 with an earlier record between their sets of
character 5-grams over the whole example, prompt and answer: on prompts alone, templated data
("Write the number in words.\n663" vs "...6634") is flagged wholesale although each record teaches
something else. Normalizing, shingling and the MinHash LSH are in dedup.py.

Content: personal data and secrets in any field of any record (content.py), each listed as
``file:line: field: kind: masked``; ``--redact OUT`` writes a copy with placeholders, ``--fail-on pii,secrets``
makes any such finding fail the check. Answers: the most frequent answer's share (a model that always gives
it scores that share). With ``--val-data``: every validation record whose prompt a training record repeats
(exact) or whose example nearly repeats one (near) is a leak, named with both lines.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.content import (
    CLASSES,
    DEFAULT_REGION,
    Finding,
    check_redact_target,
    check_region,
    redact_file,
    redact_text,
    scan_record,
    secret_scanner,
)
from lorakit.data.dedup import NEAR_THRESHOLD, SHINGLE, NearDuplicateIndex, normalize
from lorakit.data.formats import (
    CHAT_FORMATS,
    FORMATS,
    chat_messages,
    detect_file_format,
    detect_format,
    example_text,
    iter_records,
    prompt_text,
    reference_answer,
    to_segments,
    validate_record,
)
from lorakit.data.tokenize import IGNORE_INDEX, load_tokenizer, tokenize_records
from lorakit.errors import LorakitError

MIN_EXAMPLES = 1000
MAX_ANSWER_SHARE = 0.5  # warn when one answer is more than this share of all answers
_LISTED = 10  # duplicate pairs and leaks listed by name in the text report (--json lists every leak)


@dataclass
class CheckReport:
    path: str
    format: str
    records: int = 0
    errors: list[str] = field(default_factory=list)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    seq_len: int = 0
    token_lengths: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    no_response_left: int = 0
    response_lengths: dict[str, int] = field(default_factory=dict)
    roles: dict[str, int] = field(default_factory=dict)
    val_path: str | None = None
    val_records: int = 0
    val_overlap: int = 0  # validation records that leak from training, exact or near
    val_leaks: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    finding_counts: dict[str, int] = field(default_factory=dict)
    answers: int = 0
    distinct_answers: int = 0
    top_answer: str | None = None  # with any personal data or secret in it redacted
    top_answer_count: int = 0
    top_answer_share: float = 0.0
    max_answer_share: float = MAX_ANSWER_SHARE
    warnings: list[str] = field(default_factory=list)
    near_duplicate_method: str = (f"exact: same normalized prompt; near: Jaccard >= {NEAR_THRESHOLD} of character "
                                  f"{SHINGLE}-grams of the whole example (MinHash-LSH)")

    @property
    def ok(self) -> bool:
        return not self.errors


# --- the check ------------------------------------------------------------------------------------


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max; empty for no values."""
    if not values:
        return {}
    s = sorted(values)
    rank = {p: s[max(0, math.ceil(p / 100 * len(s)) - 1)] for p in (50, 90, 99)}
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": s[-1]}


def _scan(path: str, fmt: str, tokenizer: Any) -> tuple[list[tuple[int, dict]], list[str], str]:
    """Valid ``(line, record)`` pairs, every problem as ``path:line: what`` in line order, the format."""
    items = list(iter_records(path))
    if not items:
        return [], [f"{path}: no records (expected a JSON array or JSONL of objects)"], fmt
    objects = [(line, value) for line, value, problem in items if problem is None]
    errors: list[tuple[int, str]] = [(line, problem) for line, _, problem in items if problem]
    if fmt == "auto":
        try:
            fmt = detect_file_format(objects)
        except LorakitError as e:
            # no record in a known format: one line for the file, not the same line for every record
            summary = [f"{path}: {e}"] if objects else []
            return [], summary + [f"{path}:{line}: {p}" for line, p in errors], "unknown"
    valid = []
    for line, record in objects:
        try:
            own = detect_format(record)
        except LorakitError:
            own = None
        problems = validate_record(record, fmt)
        if problems and own not in (None, fmt):
            problems = [f"record looks like {own} but the file is {fmt}"]
        if not problems:
            try:  # a chat template may refuse a conversation (e.g. "roles must alternate")
                to_segments(record, fmt, tokenizer)
            except LorakitError as e:
                problems = [str(e)]
        if problems:
            errors += [(line, p) for p in problems]
        else:
            valid.append((line, record))
    return valid, [f"{path}:{line}: {p}" for line, p in sorted(errors, key=lambda e: e[0])], fmt


def _answer_balance(report: CheckReport, valid: list[tuple[int, dict]], region: str) -> None:
    """How many answers, how many distinct (normalized), the most frequent and its share."""
    answers: Counter[str] = Counter()
    first_seen: dict[str, str] = {}  # normalized answer -> the text as first written
    for _, record in valid:
        if (answer := reference_answer(record, report.format)) is not None:
            answers[normalize(answer)] += 1
            first_seen.setdefault(normalize(answer), answer.strip())
    if not answers:
        return
    top, count = answers.most_common(1)[0]
    report.answers, report.distinct_answers = answers.total(), len(answers)
    report.top_answer_count, report.top_answer_share = count, count / answers.total()
    with secret_scanner():  # the report must not repeat what it finds
        report.top_answer = redact_text(first_seen[top], region)[0]


def _content(path: str, region: str) -> list[Finding]:
    """Personal data and secrets in every JSON object of ``path``, valid record or not."""
    with secret_scanner():
        return [f for line, value, problem in iter_records(path) if problem is None
                for f in scan_record(path, line, value, region)]


def check_file(path: str | Path, tokenizer: Any, seq_len: int, fmt: str = "auto",
               val_path: str | Path | None = None, region: str = DEFAULT_REGION,
               max_answer_share: float = MAX_ANSWER_SHARE) -> CheckReport:
    """Validate every record of ``path`` (and ``val_path``), measure the valid ones, scan all for personal
    data and secrets (phone numbers without a country code read as ``region``'s)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise LorakitError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if seq_len < 1:
        raise LorakitError(f"--seq-len must be positive, got {seq_len}")
    if not 0 < max_answer_share <= 1:
        raise LorakitError(f"--max-answer-share must be in (0, 1], got {max_answer_share}")
    region = check_region(region)
    path = str(path)
    valid, errors, fmt = _scan(path, fmt, tokenizer)
    report = CheckReport(path=path, format=fmt, records=len(valid), errors=errors, seq_len=seq_len,
                         max_answer_share=max_answer_share)
    report.findings = _content(path, region)

    prompts: dict[str, int] = {}
    index = NearDuplicateIndex()
    roles: Counter[str] = Counter()
    for line, record in valid:
        prompt, whole = normalize(prompt_text(record, fmt)), example_text(record, fmt)
        if prompt in prompts:
            report.exact_duplicates += 1
            found = f"exact duplicate of line {prompts[prompt]}"
        elif (earlier := index.query(whole)) is not None:
            report.near_duplicates += 1
            found = f"near duplicate of line {earlier}"
        else:
            found = ""
        if found and len(report.duplicate_examples) < _LISTED:
            report.duplicate_examples.append(f"{path}:{line}: {found}")
        prompts.setdefault(prompt, line)
        index.add(whole, line)
        if fmt in CHAT_FORMATS:
            roles.update(m["role"] for m in chat_messages(record, fmt))
    _answer_balance(report, valid, region)
    examples = tokenize_records([r for _, r in valid], fmt, tokenizer, seq_len=1 << 62)  # untruncated
    lengths = [len(ex["input_ids"]) for ex in examples]
    responses = [sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in examples]
    report.truncated = sum(n > seq_len for n in lengths)
    report.no_response_left = sum(all(t == IGNORE_INDEX for t in ex["labels"][:seq_len]) for ex in examples)
    report.token_lengths = _percentiles(lengths)
    report.response_lengths = _percentiles(responses)
    report.roles = dict(sorted(roles.items()))

    if val_path is not None:
        report.val_path = str(val_path)
        val_valid, val_errors, val_fmt = _scan(str(val_path), fmt if fmt != "unknown" else "auto", tokenizer)
        report.errors += val_errors
        report.val_records = len(val_valid)
        for line, record in val_valid:
            if (same := prompts.get(normalize(prompt_text(record, val_fmt)))) is not None:
                report.val_leaks.append(f"{val_path}:{line}: same prompt as {path}:{same}")
            elif (near := index.query(example_text(record, val_fmt))) is not None:
                report.val_leaks.append(f"{val_path}:{line}: near duplicate of {path}:{near}")
        report.val_overlap = len(report.val_leaks)
        report.findings += _content(str(val_path), region)
    report.finding_counts = dict(Counter(f.kind for f in report.findings))
    report.warnings = _warnings(report)
    return report


def _warnings(r: CheckReport) -> list[str]:
    out = []
    if r.records < MIN_EXAMPLES:
        out.append(f"only {r.records} valid examples: LoRA needs thousands of diverse examples "
                   f"(aim for at least {MIN_EXAMPLES:,})")
    if r.exact_duplicates or r.near_duplicates:
        out.append(f"{r.exact_duplicates} prompts repeat an earlier one and {r.near_duplicates} examples nearly "
                   "repeat one: duplicates are memorized rather than learned; review and remove them")
    if r.truncated:
        out.append(f"{r.truncated} of {r.records} examples are longer than --seq-len {r.seq_len} "
                   "and would be truncated")
    if r.no_response_left:
        out.append(f"{r.no_response_left} examples keep no response token within --seq-len {r.seq_len} "
                   "(training drops them): raise --seq-len or shorten their prompts")
    if r.val_overlap:
        out.append(f"{r.val_overlap} of {r.val_records} validation prompts also appear in {r.path} "
                   "(exact or near duplicates): validation loss will look better than it is")
    if r.top_answer_count > 1 and r.top_answer_share > r.max_answer_share:
        out.append(f"{100 * r.top_answer_share:.1f}% of the answers are {_quote(r.top_answer)} (above "
                   f"--max-answer-share {r.max_answer_share:g}): a model that always answers it scores as much; "
                   "balance the answers")
    if r.findings:
        out.append(f"{len(r.findings)} findings of personal data or secrets: a model learns them and can repeat them; "
                   "remove them or write a redacted copy with --redact OUT")
    return out


def _quote(text: str | None, width: int = 40) -> str:
    text = (text or "").replace("\n", " ")
    return json.dumps(text if len(text) <= width else text[:width - 1] + "…", ensure_ascii=False)


# --- output ---------------------------------------------------------------------------------------


def _stats(d: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in d.items()) if d else "-"


def _counts(r: CheckReport, category: str) -> str:
    counts = Counter(f.kind for f in r.findings if f.category == category)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def format_report(r: CheckReport) -> str:
    """The human-readable report: bad records first, one per line, then each personal data or secret found,
    then the quality figures."""
    out = list(r.errors)
    if r.errors:
        out.append(f"{len(r.errors)} problem{'s' if len(r.errors) > 1 else ''}: fix before training")
    out += [str(f) for f in r.findings]
    out.append(f"{r.path}: {r.records} valid records, format {r.format}")
    out.append(f"duplicates: {r.exact_duplicates} exact, {r.near_duplicates} near "
               f"({r.near_duplicate_method})")
    out += [f"  {d}" for d in r.duplicate_examples]
    out.append(f"tokens per example: {_stats(r.token_lengths)}")
    pct = f" ({100 * r.truncated / r.records:.1f}%)" if r.records else ""
    out.append(f"truncated at --seq-len {r.seq_len}: {r.truncated}{pct}")
    out.append(f"response tokens: {_stats(r.response_lengths)}")
    if r.roles:
        out.append("messages by role: " + ", ".join(f"{k} {v}" for k, v in r.roles.items()))
    if r.answers and r.distinct_answers == r.answers:
        out.append(f"answers: {r.answers}, all different")
    elif r.answers:
        out.append(f"answers: {r.distinct_answers} distinct in {r.answers}; the most frequent, "
                   f"{_quote(r.top_answer)}, is {100 * r.top_answer_share:.1f}%")
    out.append(f"personal data: {_counts(r, 'pii')}; secrets: {_counts(r, 'secrets')}")
    if r.val_path is not None:
        out.append(f"validation {r.val_path}: {r.val_records} valid records, {r.val_overlap} leak from training "
                   "(same prompt or near-duplicate example)")
        out += [f"  {leak}" for leak in r.val_leaks[:_LISTED]]
        if len(r.val_leaks) > _LISTED:
            out.append(f"  ... {len(r.val_leaks) - _LISTED} more (--json lists every one)")
    out += [f"warning: {w}" for w in r.warnings]
    return "\n".join(out)


def _fail_on(text: str | None) -> tuple[str, ...]:
    """--fail-on's comma list of finding classes (pii, secrets); empty for none."""
    classes = tuple(c.strip() for c in (text or "").split(",") if c.strip())
    if bad := [c for c in classes if c not in CLASSES]:
        raise LorakitError(f"--fail-on takes a comma list of {', '.join(CLASSES)} (e.g. --fail-on pii,secrets), "
                           f"got {', '.join(map(repr, bad))}")
    return classes


def data_check_command(args: argparse.Namespace) -> int:
    """CLI entry: 1 when any record is bad (all listed) or a finding is of a --fail-on class, else 0."""
    from lorakit.config import DataConfig

    seq_len = DataConfig().seq_len if args.seq_len is None else args.seq_len
    try:
        seq_len = int(seq_len)
    except ValueError:
        raise LorakitError(f"--seq-len must be an integer, got {seq_len!r}") from None
    try:
        max_share = MAX_ANSWER_SHARE if args.max_answer_share is None else float(args.max_answer_share)
    except ValueError:
        raise LorakitError(f"--max-answer-share must be a number in (0, 1], got {args.max_answer_share!r}") from None
    fail_on = _fail_on(args.fail_on)
    region = check_region(args.phone_region or DEFAULT_REGION)
    if not Path(args.file).is_file():
        raise LorakitError(f"{args.file}: no such data file")
    if args.val_data and not Path(args.val_data).is_file():
        raise LorakitError(f"--val-data {args.val_data}: no such file")
    for name in filter(None, (args.file, args.val_data)):
        try:
            Path(name).open("rb").close()
        except OSError as e:  # before the tokenizer loads: a file that cannot be read fails at once
            raise LorakitError(f"{name}: cannot read it ({e.strerror}); check that it is a readable file") from None
    if args.redact:
        check_redact_target(args.file, args.redact)
    if not args.model:
        raise LorakitError("--model is required: the tokenizer decides token lengths (a model folder or hub id)")
    tokenizer = load_tokenizer(args.model)
    report = check_file(args.file, tokenizer, seq_len, fmt=args.format or "auto", val_path=args.val_data,
                        region=region, max_answer_share=max_share)
    failing = [f for f in report.findings if f.category in fail_on]
    redacted = redact_file(args.file, args.redact, region) if args.redact else None
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok, "fail_on": list(fail_on), "failing": len(failing),
                          "redacted": None if redacted is None else {"path": args.redact, "replaced": redacted}}))
    else:
        print(format_report(report))
        if redacted is not None:
            print(f"redacted: {args.redact} written, {redacted} findings of {args.file} replaced by placeholders")
        if failing:
            print(f"failed: {len(failing)} findings of {', '.join(fail_on)} (--fail-on)")
    return 0 if report.ok and not failing else 1
