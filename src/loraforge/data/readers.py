"""Readers: a file on disk -> `Record`s (one dict each, with the file and line it came from).

A reader only checks what it can see in the file itself (encoding, syntax, one object per line). Whether the
fields make sense is the next arrow's job (`formats.py`), which still has the file and line to point at.
New file types (JSON, CSV, CoNLL, ...) are one more function here and one more entry in `READERS`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError


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


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise LoraforgeError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    if not p.is_file():
        raise LoraforgeError(f"{p}: is a directory, not a file; give the path of one data file")
    return p


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Stream the records of a JSON Lines file, one JSON object per line.

    The file is read line by line (never whole). Blank lines are skipped. Raises `LoraforgeError` naming the file
    and line for: a missing file, bytes that are not UTF-8, a line that is not valid JSON, a line that is valid
    JSON but not an object, and a file with no records at all. The missing file is reported at call time; the
    rest as iteration reaches them.
    """
    p = _check_file(path)
    return _iter_jsonl(p, str(path))


def _iter_jsonl(p: Path, source: str) -> Iterator[Record]:
    n_records = 0
    # Binary mode: we split on b"\n" only and decode each line ourselves, so a bad byte is reported with its line
    # (a text-mode file would fail somewhere inside a read buffer, with no line number).
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            text = _decode_line(raw, source, line_no)
            if not text.strip():
                continue
            yield Record(fields=_parse_object(text, source, line_no), source=source, line=line_no)
            n_records += 1
    if n_records == 0:
        raise LoraforgeError(
            f"{source}: no records found (the file is empty or has only blank lines); "
            'put one JSON object per line, e.g. {"text": "..."}'
        )


def _decode_line(raw: bytes, source: str, line_no: int) -> str:
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoraforgeError(
            f"{source}:{line_no}: byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8; "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)"
        ) from None


def _parse_object(text: str, source: str, line_no: int) -> dict[str, Any]:
    try:
        # Without the newline, a line cut short reads "Unterminated string", not "Invalid control character".
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise LoraforgeError(
            f"{source}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); each line must be one complete "
            "JSON object; look for a line cut short, a missing quote or comma, or an object split over lines"
        ) from None
    if not isinstance(value, dict):
        raise LoraforgeError(
            f"{source}:{line_no}: expected a JSON object ({{...}}) but found a JSON {json_type(value)}; "
            'each line must be one object with named fields, e.g. {"text": "..."}'
        )
    return value


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "array", "string", ...), for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    names[type(None)] = "null"
    return names.get(type(value), type(value).__name__)


Reader = Callable[[str | os.PathLike[str]], Iterator[Record]]

READERS: dict[str, Reader] = {".jsonl": read_jsonl}
"""File suffix (lower case) -> reader. Later issues add .json, .csv, .tsv, .txt, .conll here."""


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Pick the reader for `path` by its suffix and stream its records."""
    suffix = Path(path).suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        kind = f'"{suffix}" files' if suffix else "files without a suffix"
        supported = ", ".join(sorted(READERS))
        raise LoraforgeError(
            f"{path}: cannot read {kind} yet; supported now: {supported} "
            "(one JSON object per line); convert the file or rename it if it already is JSON Lines"
        )
    return reader(path)
