"""Plain text: a `.txt` file, or a folder of them, as `{"text": ...}` records for language-model training."""
from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from pathlib import Path

from loraforge.data.readers.base import Record, decode_whole, not_utf8
from loraforge.errors import LoraforgeError

TEXT_CHUNK_BYTES = 1 << 20
"""A `.txt` file up to this size is one record; a bigger one is streamed as records of about this size."""


def read_text(path: str | os.PathLike[str], *, chunk_bytes: int = TEXT_CHUNK_BYTES) -> Iterator[Record]:
    """Stream `{"text": ...}` records from a `.txt` file or from every `.txt` file in a folder.

    A file of at most `chunk_bytes` bytes is one record holding the whole file, exactly (line 1). A bigger file is
    read a line at a time and cut into records of about `chunk_bytes` at a paragraph break (a blank line), or at a
    line break if no paragraph ends within twice that (a line longer than `chunk_bytes` is cut too); each record's
    line is where its text starts, and the records joined give back the file, apart from whitespace-only pieces.
    A folder gives its `.txt` files (not subfolders, not hidden files, not other suffixes) in name order, each
    record's `source` being that file. Raises `LoraforgeError` for a missing path, bad bytes (file, line, column),
    a file with no text, and a folder with no `.txt` file.
    """
    p = Path(path)
    if not p.exists():
        raise LoraforgeError(f"{p}: file not found; check the path (relative paths start at {Path.cwd()})")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise LoraforgeError(f"chunk_bytes is {chunk_bytes!r}; it must be a positive number of bytes")
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() == ".txt"]
        files = [f for f in files if not f.name.startswith(".")]
        if not files:
            suffixes = sorted({f.suffix or "(none)" for f in p.iterdir() if f.is_file()})
            found = f"found only: {', '.join(suffixes)}" if suffixes else "it is empty"
            raise LoraforgeError(f"{p}: no .txt files in this folder ({found}); a folder is read as one text per file")
        return _iter_folder([(f, os.path.join(str(path), f.name)) for f in files], chunk_bytes)
    return _iter_file(p, str(path), chunk_bytes)


def _iter_folder(files: list[tuple[Path, str]], chunk_bytes: int) -> Iterator[Record]:
    for p, source in files:
        yield from _iter_file(p, source, chunk_bytes)


def _iter_file(p: Path, source: str, chunk_bytes: int) -> Iterator[Record]:
    n_records = 0
    if p.stat().st_size <= chunk_bytes:
        text = decode_whole(p.read_bytes(), source)
        if text.strip():
            n_records = 1
            yield Record(fields={"text": text}, source=source, line=1)
    else:
        for line, text in _chunks(p, source, chunk_bytes):
            n_records += 1
            yield Record(fields={"text": text}, source=source, line=line)
    if n_records == 0:
        raise LoraforgeError(f"{source}: no text in this file (it is empty or only whitespace); remove it or fill it")


def _chunks(p: Path, source: str, chunk_bytes: int) -> Iterator[tuple[int, str]]:
    """`(first line, text)` pieces of about `chunk_bytes` bytes, cut after a blank line where possible."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    size = start_line = 0
    line_no, column = 1, 0  # where the next read starts; column in bytes
    with p.open("rb") as f:
        while raw := f.readline(chunk_bytes):  # a line, or a piece of a longer one
            try:
                piece = decoder.decode(raw)
            except UnicodeDecodeError as e:
                held = len(e.object) - len(raw)  # bytes of a character the previous read cut in two
                raise not_utf8(source, line_no, column + e.start - held + 1, e.object[e.start]) from None
            if line_no == 1 and column == 0:
                piece = piece.removeprefix("\ufeff")
            if not parts:
                start_line = line_no
            parts.append(piece)
            size += len(raw)
            ends_line = raw.endswith(b"\n")
            line_no, column = (line_no + 1, 0) if ends_line else (line_no, column + len(raw))
            if size >= 2 * chunk_bytes or (size >= chunk_bytes and ends_line and not piece.strip()):
                text = "".join(parts)
                parts, size = [], 0
                if text.strip():
                    yield start_line, text
    try:
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise LoraforgeError(
            f"{source}:{line_no}: the file ends in the middle of a UTF-8 character; it looks cut short"
        ) from None
    text = "".join(parts)
    if text.strip():
        yield start_line, text
