"""A JSON document read a piece at a time, with line numbers: enough to stream the records out of one big file.

`json` parses a whole string and keeps no positions. `JsonCursor` holds a window of the file's text instead:
containers on the way down to the records (the top-level array, SQuAD's `data`/`paragraphs`/`qas`) are walked
by hand, so each record's line is known, and every record itself is parsed by the C decoder (`raw_decode`).
Memory is bounded by the largest single value that is parsed whole, not by the file.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from loraforge.data.readers.base import not_utf8
from loraforge.errors import LoraforgeError

READ_BYTES = 1 << 16
_DECODER = json.JSONDecoder()
_NON_SPACE = re.compile(r"[^ \t\n\r]")


class JsonCursor:
    """A read position in a JSON file opened in binary mode; `source` is the name used in error messages."""

    def __init__(self, f: BinaryIO, source: str) -> None:
        self.source = source
        self._f = f
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""  # decoded text; everything before _pos is parsed
        self._pos = 0
        self._eof = False
        self._started = False  # a byte-order mark is dropped from the very start only
        self._line = 1  # line number of _buf[_counted]
        self._counted = 0
        self._col0 = 0  # 0-based column of _buf[0] on its line
        self._raw_line = 1  # bytes read so far: their line and byte column, for non-UTF-8 errors
        self._raw_col = 0

    # --- reading ------------------------------------------------------------------------------------------------

    def _fill(self, want: int = 0) -> bool:
        """Append about `want` more bytes of text to the window; False once the file is exhausted."""
        if self._eof:
            return False
        self._drop_parsed()
        raw = self._f.read(max(want, READ_BYTES))
        try:
            text = self._decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise self._byte_error(raw, e) from None
        nl = raw.rfind(b"\n")
        self._raw_line += raw.count(b"\n")
        self._raw_col = len(raw) - nl - 1 if nl >= 0 else self._raw_col + len(raw)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buf += text
        self._eof = not raw
        return bool(raw)

    def _byte_error(self, raw: bytes, e: UnicodeDecodeError) -> LoraforgeError:
        held = len(e.object) - len(raw)  # bytes of a character the previous read cut in two
        before = raw[: max(e.start - held, 0)]
        nl = before.rfind(b"\n")
        column = len(before) - nl if nl >= 0 else self._raw_col + e.start - held + 1
        return not_utf8(self.source, self._raw_line + before.count(b"\n"), column, e.object[e.start])

    def _drop_parsed(self) -> None:
        """Forget the text before the read position once it is most of the window, keeping line and column."""
        pos = self._pos
        if pos < READ_BYTES or pos < len(self._buf) // 2:
            return
        self.line()  # counts newlines up to _pos
        nl = self._buf.rfind("\n", 0, pos)
        self._col0 = pos - nl - 1 if nl >= 0 else self._col0 + pos
        self._buf = self._buf[pos:]
        self._pos = self._counted = 0

    # --- positions ----------------------------------------------------------------------------------------------

    def line(self, pos: int | None = None) -> int:
        """The 1-based line of `pos` in the window (default: the read position)."""
        pos = self._pos if pos is None else pos
        if pos >= self._counted:
            self._line += self._buf.count("\n", self._counted, pos)
        else:
            self._line -= self._buf.count("\n", pos, self._counted)
        self._counted = pos
        return self._line

    def _column(self, pos: int) -> int:
        nl = self._buf.rfind("\n", 0, pos)
        return pos - nl if nl >= 0 else self._col0 + pos + 1

    def error(self, message: str, pos: int | None = None) -> LoraforgeError:
        """A `LoraforgeError` for `pos` (default: the read position): `file:line: message`."""
        return LoraforgeError(f"{self.source}:{self.line(pos)}: {message}")

    # --- tokens -------------------------------------------------------------------------------------------------

    def peek(self) -> str:
        """Skip whitespace and return the next character without consuming it ("" at the end of the file)."""
        while True:
            found = _NON_SPACE.search(self._buf, self._pos)
            if found:
                self._pos = found.start()
                return self._buf[self._pos]
            self._pos = len(self._buf)
            if not self._fill():
                return ""

    def expect(self, allowed: str, what: str, inside: str) -> str:
        """Consume one of the characters in `allowed`, else raise saying `what` was expected `inside` what."""
        char = self.peek()
        if not char:
            raise self.error(f"the file ends inside {inside}, where {what} should come; it looks cut short")
        if char not in allowed:
            raise self.error(
                f"not valid JSON (expected {what} but found {char!r}, column {self._column(self._pos)}); "
                "look for a missing comma or bracket"
            )
        self._pos += 1
        return char

    def value(self) -> Any:
        """Parse and consume the next complete JSON value (object, array, string, number, ...)."""
        while True:
            self.peek()
            start = self._pos
            try:
                value, end = _DECODER.raw_decode(self._buf, start)
            except json.JSONDecodeError as e:
                if not self._eof and (e.pos >= len(self._buf) - 8 or e.msg.startswith("Unterminated string")):
                    self._fill(len(self._buf) - start)  # the value may go on: read as much again, and retry
                    continue
                raise self._json_error(e, start) from None
            if end == len(self._buf) and self._fill():
                continue  # a number at the end of the window may go on in the next read
            self._pos = end
            return value

    def _json_error(self, e: json.JSONDecodeError, start: int) -> LoraforgeError:
        start_line, column = self.line(start), self._column(e.pos)
        at_end = e.pos >= len(self._buf.rstrip()) or ("escape" in e.msg and '"' not in self._buf[e.pos:])
        if e.msg.startswith("Unterminated string") or (self._eof and at_end):
            return self.error(
                f"not valid JSON: the file ends inside the value that starts at line {start_line} "
                f"({e.msg.removesuffix(' at')}, column {column}); it looks cut short", e.pos
            )
        hint = "look for a missing quote, comma or bracket"
        if e.msg.startswith("Expecting") and self._buf[e.pos:e.pos + 1] in ("]", "}"):
            hint = "remove the comma before the closing bracket (JSON allows no trailing comma)"
        return self.error(
            f"not valid JSON ({e.msg}, column {column}), in the value that starts at line {start_line}; {hint}", e.pos
        )

    # --- containers ---------------------------------------------------------------------------------------------

    def array_items(self, inside: str) -> Iterator[int]:
        """Walk an array: yield the line of each element; the caller consumes the element before resuming."""
        start = self.line() if self.peek() else 0
        self.expect("[", "an array [...]", inside)
        where = f"the array that starts at line {start}"
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            self.peek()
            yield self.line()
            if self.expect(",]", '"," or "]"', where) == "]":
                return

    def object_members(self, inside: str) -> Iterator[tuple[str, int]]:
        """Walk an object: yield each key and its line; the caller consumes the value before resuming."""
        start = self.line() if self.peek() else 0
        self.expect("{", "an object {...}", inside)
        where = f"the object that starts at line {start}"
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            self.expect('"', "a key in double quotes", where)
            self._pos -= 1  # the key is parsed with its quotes
            line = self.line()
            key = self.value()
            self.expect(":", '":" after the key', where)
            yield key, line
            if self.expect(",}", '"," or "}"', where) == "}":
                return

    def expect_end(self) -> None:
        """Check nothing but whitespace follows the top-level value."""
        if self.peek():
            raise self.error(
                "more JSON after the end of the top-level value; a .json file holds one value (an array of "
                "records); for one object per line, name the file .jsonl or pass format=\"jsonl\""
            )
