"""JSON Lines: one JSON object per line."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.data.readers.base import Record, check_file, iter_lines, json_type, no_records
from loraforge.errors import LoraforgeError


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Stream the records of a JSON Lines file, one JSON object per line.

    The file is read line by line (never whole). Blank lines are skipped. Raises `LoraforgeError` naming the file
    and line for: a missing file, bytes that are not UTF-8, a line that is not valid JSON, a line that is valid
    JSON but not an object, and a file with no records at all. The missing file is reported at call time; the
    rest as iteration reaches them.
    """
    p = check_file(path)
    return _iter_jsonl(p, str(path))


def _iter_jsonl(p: Path, source: str) -> Iterator[Record]:
    n_records = 0
    for line_no, text in iter_lines(p, source):
        if not text.strip():
            continue
        yield Record(fields=_parse_object(text, source, line_no), source=source, line=line_no)
        n_records += 1
    if n_records == 0:
        raise no_records(
            source, 'the file is empty or has only blank lines; put one JSON object per line, e.g. {"text": "..."}'
        )


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
