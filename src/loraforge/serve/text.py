"""Token ids to text as they arrive, with OpenAI's `stop` strings.

Text is decoded from all ids so far (a token's text can depend on its neighbours) and handed out only once it is
final: a trailing replacement character (half of a multi-byte character) and any tail that could still grow into a
stop string are held back. When a stop string appears, the text ends just before it.
"""
from __future__ import annotations


class TextStream:
    """The text of one generation, released piece by piece; `finished` once a stop string was met."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already released
        self.text = ""
        self.finished = False

    def push(self, ids: list[int]) -> str:
        """Add new token ids; the text now safe to release (may be empty)."""
        if self.finished:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finished, self.text = True, text[:max(cut, self.sent)]
            return self._release(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        safe -= hold  # a tail that may be the start of a stop string waits for the next tokens
        return self._release(safe)

    def flush(self) -> str:
        """The rest of the text, at the end of the generation."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
