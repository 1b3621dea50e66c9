"""Training-data formats: read JSON/JSONL records, tell their format, check them, render them.

A record renders to ``(text, is_response)`` segments; tokenization (tokenize.py) trains on the
response segments only, so the model learns to answer, not to repeat the question.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion", "text")
CHAT_FORMATS = ("chat", "sharegpt")  # conversations: rendered with the chat template, trained on the answers
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT (``{"conversations": [{"from": "human", "value": ...}]}``) speakers -> chat roles, as LLaMA-Factory
# maps them (observation: a tool's result; function_call: the model calling one), plus the chat names
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool",
                  "function_call": "assistant", "user": "user", "assistant": "assistant", "tool": "tool"}
# per conversation format: (list key, speaker key, text key, speaker -> role)
_TURNS = {"chat": ("messages", "role", "content", {r: r for r in ROLES}),
          "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES)}

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# The ChatML layout used when a tokenizer has no chat template of its own; the Jinja form is for
# anything that renders prompts at inference time (``tokenizer.apply_chat_template(chat_template=...)``)
# and renders exactly what ``to_segments`` trains on.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_FORMAT_HINT = ("instruction/output (alpaca), messages (chat), conversations (sharegpt), prompt/completion "
                "(prompt_completion) or text")


# --- reading ------------------------------------------------------------------------------------


def iter_records(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, value, problem)`` for each element of a JSON array or JSONL file.

    ``problem`` is None for a JSON object, else what is wrong (invalid JSON, not an object).
    A JSON array stops at its first syntax error (nothing after it can be located); JSONL goes on.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise LorakitError(f"{p}: data file not found") from None
    except IsADirectoryError:
        raise LorakitError(f"{p}: is a folder, expected a JSON or JSONL file") from None
    except OSError as e:  # permission denied, an I/O error
        raise LorakitError(f"{p}: cannot read it ({e.strerror}); check that it is a readable file") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, as some editors write
    if raw.lstrip()[:1] != b"[":
        yield from _iter_jsonl(raw)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield raw[: e.start].count(b"\n") + 1, None, f"not UTF-8 text (byte {e.start})"
        return
    yield from _iter_array(text)


def _object_problem(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _json_problem(e: json.JSONDecodeError) -> str:
    # some of json's messages end in "at" already ("Unterminated string starting at")
    return f"invalid JSON ({e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno})"


def _iter_jsonl(raw: bytes) -> Iterator[tuple[int, Any, str | None]]:
    # split bytes on \n only: str.splitlines would also split at U+2028 inside a JSON string
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield number, None, f"not UTF-8 text (column {e.start + 1})"
            continue
        except json.JSONDecodeError as e:
            yield number, None, _json_problem(e)
            continue
        yield number, value, _object_problem(value)


def _iter_array(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Walk the array element by element so each record keeps the line where it starts."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = text.index("[") + 1
    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line_at(e.pos), None, _json_problem(e)
            return
        yield line_at(pos), value, _object_problem(value)
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            if text[skip(pos + 1):]:
                yield line_at(skip(pos + 1)), None, "invalid JSON (extra data after the closing ])"
            return
        else:
            yield line_at(min(pos, len(text))), None, "invalid JSON (expected , or ] after an array element)"
            return


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for each record of a JSON array or JSONL file (told apart by content).

    Raises LorakitError("path:line: what is wrong") at the first invalid line or non-object record.
    """
    out = []
    for line, value, problem in iter_records(path):
        if problem:
            raise LorakitError(f"{path}:{line}: {problem} (lorakit data check lists every bad record)")
        out.append((line, value))
    return out


# --- formats ------------------------------------------------------------------------------------


def detect_format(record: dict) -> str:
    """The format a record's keys point to; LorakitError when none does."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise LorakitError(f"cannot tell the format from keys {sorted(record)}: expected {_FORMAT_HINT}")


def detect_file_format(records: list[tuple[int, dict]]) -> str:
    """The most common format among the records (so one odd record can't decide for a whole file)."""
    counts: Counter[str] = Counter()
    for _, record in records:
        try:
            counts[detect_format(record)] += 1
        except LorakitError:
            pass
    if not counts:
        keys = Counter(tuple(sorted(map(str, record))) for _, record in records).most_common(1)
        seen = f" (the records have keys {list(keys[0][0])})" if keys else ""
        raise LorakitError(f"none of the {len(records)} records has the keys of a known format{seen}: expected "
                           f"{_FORMAT_HINT}")
    return counts.most_common(1)[0][0]


def _text_field(record: dict, key: str, required: bool = True, empty_ok: bool = False,
                response: bool = False) -> list[str]:
    if key not in record:
        return [f"missing field {key!r}"] if required else []
    value = record[key]
    if not isinstance(value, str):
        return [f"field {key!r} must be a string, got {type(value).__name__}"]
    if required and not empty_ok and not value.strip():
        return [f"field {key!r} is empty" + (" (empty response)" if response else "")]
    return []


def validate_record(record: dict, fmt: str) -> list[str]:
    """Everything wrong with ``record`` as an example of ``fmt``; empty when it is fine."""
    if fmt not in FORMATS:
        raise LorakitError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "alpaca":
        return (_text_field(record, "instruction") + _text_field(record, "input", required=False)
                + _text_field(record, "output", response=True))
    if fmt == "prompt_completion":
        return _text_field(record, "prompt", empty_ok=True) + _text_field(record, "completion", response=True)
    if fmt == "text":
        return _text_field(record, "text")
    return _validate_turns(record, fmt)


def _validate_turns(record: dict, fmt: str) -> list[str]:
    """A conversation (chat or sharegpt), in the format's own field names."""
    key, speaker, text, roles = _TURNS[fmt]
    turns = record.get(key)
    if turns is None:
        return [f"missing field {key!r}"]
    if not isinstance(turns, list):
        return [f"field {key!r} must be a list, got {type(turns).__name__}"]
    if not turns:
        return [f"field {key!r} is empty"]
    problems = []
    if fmt == "sharegpt" and not isinstance(record.get("system", ""), str):
        problems.append(f"field 'system' must be a string, got {type(record['system']).__name__}")
    answered = False
    for i, m in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where} must be an object, got {type(m).__name__}")
            continue
        role, content = m.get(speaker), m.get(text)
        if role is None:
            problems.append(f"{where}: missing field {speaker!r}")
        elif role not in roles:
            what = "role" if fmt == "chat" else f"{speaker!r} value"
            problems.append(f"{where}: unknown {what} {role!r} (expected {', '.join(roles)})")
        if content is None:
            problems.append(f"{where}: missing field {text!r}")
        elif not isinstance(content, str):
            problems.append(f"{where}: field {text!r} must be a string, got {type(content).__name__}")
        elif roles.get(role) == "assistant":
            if content.strip():
                answered = True
            else:
                problems.append(f"{where}: {role} message is empty (empty response)")
    if not problems and not answered:
        problems.append("no assistant message: nothing to train on" if fmt == "chat" else
                        "no gpt (assistant) turn: nothing to train on")
    return problems


def chat_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """A valid chat or sharegpt record's turns as chat messages (``{"role", "content"}``); a sharegpt
    record's top-level ``system`` string comes first, as LLaMA-Factory reads it."""
    key, speaker, text, roles = _TURNS[fmt]
    out = [{"role": roles[m[speaker]], "content": m[text]} for m in record[key]]
    if fmt == "sharegpt" and record.get("system") and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": record["system"]})
    return out



def reference_answer(record: dict, fmt: str) -> str | None:
    """What a valid record trains the model to reply (a conversation's last assistant turn); None for text."""
    if fmt == "alpaca":
        return record["output"]
    if fmt == "prompt_completion":
        return record["completion"]
    if fmt in CHAT_FORMATS:
        return [m["content"] for m in chat_messages(record, fmt) if m["role"] == "assistant"][-1]
    return None


# --- rendering ----------------------------------------------------------------------------------


def eos_text(tokenizer: Any) -> str:
    """The end-of-sequence marker appended to responses: eos, else sep (BERT-style), else nothing."""
    return tokenizer.eos_token or getattr(tokenizer, "sep_token", None) or ""


def to_segments(record: dict, fmt: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered example as ``(text, is_response)`` pieces, in order; the record must be valid."""
    eos = eos_text(tokenizer)
    if fmt == "alpaca":
        inp = record.get("input") or ""
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=inp)
        return [(prompt, False), (record["output"] + eos, True)]
    if fmt == "prompt_completion":
        return [(record["prompt"], False), (record["completion"] + eos, True)]
    if fmt == "text":
        return [(record["text"] + eos, True)]
    if fmt in CHAT_FORMATS:
        turns = chat_messages(record, fmt)
        if getattr(tokenizer, "chat_template", None):
            return _template_segments(turns, tokenizer)
        return _chatml_segments(turns, eos)
    raise LorakitError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _chatml_segments(messages: list[dict], eos: str) -> list[tuple[str, bool]]:
    """CHATML_TEMPLATE, piece by piece. An eos follows a final assistant turn so that a model
    without a chat template of its own also learns to stop where its answer ends."""
    out: list[tuple[str, bool]] = []
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        body = f"{m['content']}<|im_end|>\n"
        if m["role"] == "assistant":
            out += [(head, False), (body, True)]
        else:
            out.append((head + body, False))
    if messages[-1]["role"] == "assistant" and eos:
        out.append((eos, True))
    return _merge(out)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _template_segments(messages: list[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the tokenizer's chat template rendering into prompt and response pieces.

    Render the conversation prefix by prefix: an assistant turn's piece is what rendering it adds
    after the generation prompt (so the response includes the template's end-of-turn marker).
    Templates that rewrite earlier turns (not prefix-stable) fall back to locating each answer.
    """
    try:
        full = _render(tokenizer, messages)
    except Exception as e:  # jinja errors and the template's own raise_exception (e.g. "roles must alternate")
        raise LorakitError(f"the tokenizer's chat template rejects this conversation: {e}") from None
    out: list[tuple[str, bool]] = []
    done = ""
    try:
        for k, m in enumerate(messages, 1):
            upto = _render(tokenizer, messages[:k])
            if m["role"] == "assistant":
                asked = _render(tokenizer, messages[: k - 1], generation_prompt=True)
                if not (asked.startswith(done) and upto.startswith(asked)):
                    raise ValueError("not prefix-stable")
                out += [(asked[len(done):], False), (upto[len(asked):], True)]
            else:
                if not upto.startswith(done):
                    raise ValueError("not prefix-stable")
                out.append((upto[len(done):], False))
            done = upto
        if not full.startswith(done):
            raise ValueError("not prefix-stable")
        out.append((full[len(done):], False))
    except Exception:  # the template's own errors (jinja, raise_exception) or a non-prefix rendering
        return _located_segments(full, messages)
    return _merge(out)


def _located_segments(full: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """Find each assistant answer in the rendered text, in order; everything else is prompt."""
    out: list[tuple[str, bool]] = []
    cursor = 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        start = full.find(m["content"], cursor)
        if start < 0:
            raise LorakitError("the tokenizer's chat template drops assistant messages; use another --format")
        end = start + len(m["content"])
        out += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    out.append((full[cursor:], False))
    return _merge(out)


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop empty pieces and join neighbours of the same kind."""
    out: list[tuple[str, bool]] = []
    for text, is_response in segments:
        if not text:
            continue
        if out and out[-1][1] == is_response:
            out[-1] = (out[-1][0] + text, is_response)
        else:
            out.append((text, is_response))
    return out


def prompt_text(record: dict, fmt: str) -> str:
    """The part of a record a user asks (for duplicate and overlap checks): everything but the answers."""
    if fmt == "alpaca":
        return f"{record.get('instruction', '')}\n{record.get('input') or ''}"
    if fmt == "prompt_completion":
        return record.get("prompt", "")
    if fmt == "text":
        return record.get("text", "")
    return "\n".join(m["content"] for m in chat_messages(record, fmt) if m["role"] != "assistant")


def example_text(record: dict, fmt: str) -> str:
    """Question and answers together (for near-duplicate checks)."""
    if fmt == "alpaca":
        return f"{prompt_text(record, fmt)}\n{record.get('output', '')}"
    if fmt == "prompt_completion":
        return f"{record.get('prompt', '')}\n{record.get('completion', '')}"
    if fmt == "text":
        return record.get("text", "")
    return "\n".join(m["content"] for m in chat_messages(record, fmt))
