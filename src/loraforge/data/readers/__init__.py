"""Readers: a file on disk -> `Record`s (one dict each, with the file and line it came from).

A reader only checks what it can see in the file itself (encoding, syntax, columns). Whether the fields make
sense is the next arrow's job (`formats.py`), which still has the file and line to point at. Every reader
streams: the first record comes out before the file is read whole (see each reader for its bound).

| format | suffix | one record per | fields |
|---|---|---|---|
| jsonl | .jsonl | line | the object's own |
| json | .json | array element | the object's own |
| json | .json | SQuAD question | id, title, context, question, answers, answer_starts (+ is_impossible) |
| json | .json | PubMedQA PMID | id, question, context, long_answer, label |
| csv, tsv | .csv, .tsv | row after the header | the header's column names (values are strings) |
| text | .txt, a folder | file (or ~1 MiB piece of a bigger one) | text |
| conll | .conll | sentence | tokens, ner_tags (+ pos_tags, chunk_tags) |
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from loraforge.data.readers.base import Record, json_type
from loraforge.data.readers.conll import read_conll
from loraforge.data.readers.delimited import read_csv, read_tsv
from loraforge.data.readers.json_file import read_json
from loraforge.data.readers.jsonl import read_jsonl
from loraforge.data.readers.text import TEXT_CHUNK_BYTES, read_text
from loraforge.errors import LoraforgeError

Reader = Callable[..., Iterator[Record]]

FILE_FORMATS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "text": read_text,
    "conll": read_conll,
}
"""Format name (the `format=` of `read_records`) -> reader."""

SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".conll": "conll",
}
"""File suffix (lower case) -> format name, for `format=None`. A folder is read as "text"."""

READERS: dict[str, Reader] = {suffix: FILE_FORMATS[name] for suffix, name in SUFFIXES.items()}
"""File suffix (lower case) -> reader."""

_OPTIONS = {"delimiter": ("csv", "tsv"), "tag_column": ("conll",)}


def read_records(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    delimiter: str | None = None,
    tag_column: int | None = None,
) -> Iterator[Record]:
    """Stream the records of `path` with the reader for `format` (one of `FILE_FORMATS`), by default chosen by
    the file's suffix (`SUFFIXES`; a folder is "text").

    `delimiter` (csv/tsv) overrides the column separator; `tag_column` (conll) picks the column that becomes
    `ner_tags`. A missing path, an unknown format or suffix and an option the format has no use for are reported
    here, at call time; problems inside the file as iteration reaches them.
    """
    fmt = _format_of(path) if format is None else format
    if fmt not in FILE_FORMATS:
        raise LoraforgeError(f"unknown data format {fmt!r}; choose one of: {', '.join(FILE_FORMATS)}")
    given = {"delimiter": delimiter, "tag_column": tag_column}
    options = {name: value for name, value in given.items() if value is not None}
    for name in options:
        if fmt not in _OPTIONS[name]:
            raise LoraforgeError(
                f"{path}: {name} applies to {' and '.join(_OPTIONS[name])} files only, and this one is read as {fmt}"
            )
    return FILE_FORMATS[fmt](path, **options)


def _format_of(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.exists():
        raise LoraforgeError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    if p.is_dir():
        return "text"
    suffix = p.suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    kind = f'"{suffix}" files' if suffix else "files without a suffix"
    known = ", ".join(SUFFIXES)
    raise LoraforgeError(
        f"{path}: cannot tell the format of {kind}; known suffixes: {known}; rename the file or give the format "
        f"explicitly, one of: {', '.join(FILE_FORMATS)}{_sniff(p)}"
    )


def _sniff(p: Path) -> str:
    """A hint from the first bytes, for the unknown-suffix message ("" if nothing is recognised)."""
    with p.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"-DOCSTART-"):
        return ' (this file starts with -DOCSTART-, so it looks like CoNLL columns: format="conll")'
    if head.startswith(b"{") and b"}\n{" in head.replace(b"\r\n", b"\n"):
        return ' (it looks like one JSON object per line: format="jsonl")'
    return ""


__all__ = [
    "FILE_FORMATS",
    "READERS",
    "SUFFIXES",
    "TEXT_CHUNK_BYTES",
    "Reader",
    "Record",
    "json_type",
    "read_conll",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_records",
    "read_text",
    "read_tsv",
]
