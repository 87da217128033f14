"""What every reader shares: the `Record` type, path checks, and UTF-8 decoding that reports line and column."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Record:
    """One record of a data file, as read, before anyone interprets it."""

    fields: dict[str, Any]
    """The record's keys and values, exactly as parsed."""
    source: str
    """The path of the file it came from, as the user gave it."""
    line: int
    """1-based line number of the record in `source`."""

    @property
    def where(self) -> str:
        """`file:line`, the prefix of every error message about this record."""
        return f"{self.source}:{self.line}"


def check_file(path: str | os.PathLike[str]) -> Path:
    """`path` as a `Path`, or a `LoraforgeError` if it is missing or a folder."""
    p = Path(path)
    if not p.exists():
        raise LoraforgeError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    if not p.is_file():
        raise LoraforgeError(f"{p}: is a directory, not a file; give the path of one data file")
    return p


def iter_lines(p: Path, source: str) -> Iterator[tuple[int, str]]:
    """Stream `(line number, text)` for each physical line of `p`, line ending kept, decoded as UTF-8.

    Binary mode: we split on b"\\n" only and decode each line ourselves, so a bad byte is reported with its line
    (a text-mode file would fail somewhere inside a read buffer, with no line number).
    """
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            yield line_no, decode_line(raw, source, line_no)


def decode_line(raw: bytes, source: str, line_no: int) -> str:
    """One physical line as text; a UTF-8 byte-order mark on line 1 (as some Windows editors write) is dropped."""
    if line_no == 1 and raw.startswith(_BOM):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(source, line_no, e.start + 1, raw[e.start]) from None


def decode_whole(data: bytes, source: str) -> str:
    """A whole (small) file as text; a bad byte is reported with its line and column."""
    if data.startswith(_BOM):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise not_utf8(source, data.count(b"\n", 0, e.start) + 1, e.start - line_start + 1, data[e.start]) from None


def not_utf8(source: str, line_no: int, column: int, byte: int) -> LoraforgeError:
    """The error for a byte that is not UTF-8; `column` counts bytes from 1."""
    suffix = Path(source).suffix
    return LoraforgeError(
        f"{source}:{line_no}: byte {byte:#04x} at column {column} is not UTF-8; save the file as UTF-8 "
        f"(e.g. `iconv -f latin1 -t utf-8 in{suffix} > out{suffix}`)"
    )


def no_records(source: str, what: str) -> LoraforgeError:
    """The error for a file that holds nothing to train on; `what` says what is there and what a record looks like."""
    return LoraforgeError(f"{source}: no records found: {what}")


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "array", "string", ...), for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    names[type(None)] = "null"
    return names.get(type(value), type(value).__name__)
