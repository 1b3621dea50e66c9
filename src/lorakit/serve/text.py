"""Token ids -> text, a piece at a time, as a stream would show it; stop strings cut the text.

Decoding token by token is not decoding one token at a time: a multi-byte character can span tokens (the
partial decode ends in U+FFFD), and SentencePiece-style tokenizers only know whether a piece starts with a
space from its neighbour. So each step decodes a short window (from the token before the last emitted
piece) twice, with and without the new tokens, and emits the difference once it is whole (the method of
vLLM's and text-generation-inference's detokenizers).

Text that may still turn into a stop string is held back until it either does (and is cut, with
everything after it) or cannot any more. Streaming and non-streaming responses both come from here, so at
temperature 0 they are the same text.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of text handed out
        self.stopped = False  # a stop string was found
        self.tokens_used = 0  # tokens up to and including the one that completed the text (or the stop string)
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] is the context already shown

    def add(self, token: int) -> str:
        """Feed one generated token; returns the text that became safe to show (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.tokens_used = len(self.ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before):])
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: whatever is still held back (an incomplete character, a partial stop)."""
        if not self.stopped:
            before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
            if len(after) > len(before):
                self._append(after[len(before):])
                self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
