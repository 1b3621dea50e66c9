"""An Ollama ``Modelfile``: FROM the base GGUF, ADAPTER the LoRA GGUF, TEMPLATE the prompt as training rendered it.

Ollama's templates are Go templates, not Jinja. A Jinja chat template is translated by rendering it around
marker strings (what comes before and after each role's content, the conversation's start, the generation
prompt), writing those pieces into a Go template, and then *checking* the translation: the Go template,
evaluated here for test conversations, must give exactly the Jinja rendering. A template that does not
decompose this way (one that rewrites content, or numbers turns) gets no TEMPLATE line, and the note says
Ollama will fall back on its own detection of the GGUF's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.formats import ALPACA_PROMPT_NO_INPUT

_MARK = "\x01LORAKIT{}\x02"


@dataclass
class ChatPieces:
    start: str
    before: dict[str, str]   # role -> text before its content
    after: dict[str, str]    # role -> text after its content
    generation: str          # the assistant turn's opening, appended after the last message

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template below gives for ``messages`` (the translation's check)."""
        body = "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return self.start + body + self.generation

    def go_template(self) -> str:
        branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
                           f"{self.before[role]}{{{{ .Content }}}}{self.after[role]}"
                           for i, role in enumerate(self.before))
        return f"{self.start}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.generation}"


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def chat_pieces(tokenizer: Any) -> ChatPieces | None:
    """The chat template cut into per-role pieces, or None when it is not that simple (checked)."""
    m = [_MARK.format(i) for i in range(4)]
    try:
        one = _render(tokenizer, [{"role": "user", "content": m[0]}], False)
        two = _render(tokenizer, [{"role": "user", "content": m[0]}, {"role": "user", "content": m[1]}], False)
        pre1, post1 = one.split(m[0])
        between = two.split(m[0])[1].split(m[1])[0]
        if not between.startswith(post1) or not pre1.endswith(between[len(post1):]):
            return None
        before = {"user": between[len(post1):]}
        after = {"user": post1}
        start = pre1[: len(pre1) - len(before["user"])]
        generation = _render(tokenizer, [{"role": "user", "content": m[0]}], True)[len(one):]
        for role in ("assistant", "system"):
            msgs = [{"role": "user", "content": m[0]}, {"role": "assistant", "content": m[1]}] if role == "assistant" \
                else [{"role": "system", "content": m[2]}, {"role": "user", "content": m[0]}]
            try:
                text = _render(tokenizer, msgs, False)
            except Exception:  # a template that refuses this role (e.g. no system turns) simply lacks it
                continue
            marker = m[1] if role == "assistant" else m[2]
            head, tail = text.split(marker)
            if role == "assistant":
                before[role] = head[len(one):]
                after[role] = tail
            else:
                before[role] = head[len(start):]
                after[role] = tail[: len(tail) - len(one) + len(start)]
    except (ValueError, IndexError, TypeError, AttributeError):
        return None
    except Exception:  # jinja2 errors: a template that needs more than messages
        return None
    pieces = ChatPieces(start, before, after, generation)
    tests = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Name a colour.\nOne word."}]]
    if "system" in before:
        tests.append([{"role": "system", "content": "Be brief."}, *tests[1]])
    try:
        if all(pieces.render(t) == _render(tokenizer, t, True) for t in tests):
            return pieces
    except Exception:
        return None
    return None


def modelfile(base: str, adapter: str | None, tokenizer: Any, data_format: str | None) -> tuple[str, str | None]:
    """(Modelfile text, a note when the template could not be written). ``data_format`` is how the adapter's
    training data was rendered: alpaca records were trained on the alpaca prompt, so that is the template;
    chat records on the tokenizer's chat template, translated to Go (above)."""
    lines = [f"FROM {base}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    note = None
    if data_format == "alpaca":
        template = ALPACA_PROMPT_NO_INPUT.format(instruction="{{ .Prompt }}")
        lines.append(f'TEMPLATE """{template}"""')
    elif data_format in ("prompt_completion", "text"):
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif getattr(tokenizer, "chat_template", None):
        pieces = chat_pieces(tokenizer)
        if pieces is None:
            note = "chat template not translatable to Go: Ollama will detect it from the GGUF"
        else:
            lines.append(f'TEMPLATE """{pieces.go_template()}"""')
            stop = pieces.after.get("assistant", "").strip()
            if stop:
                lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n", note
