"""CoNLL column files (CoNLL-2003 NER and the like): one token per line, a blank line after each sentence."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from loraforge.data.readers.base import Record, check_file, iter_lines, no_records
from loraforge.errors import LoraforgeError

DOCSTART = "-DOCSTART-"
# CoNLL-2003's four columns: token, part of speech, syntactic chunk, named entity.
_CONLL2003 = {1: "pos_tags", 2: "chunk_tags"}


def read_conll(path: str | os.PathLike[str], *, tag_column: int = -1) -> Iterator[Record]:
    """Stream one record per sentence of a CoNLL column file.

    Each non-blank line is a token and its columns, separated by whitespace; a blank line ends a sentence; a line
    starting with `-DOCSTART-` (a document boundary) is skipped. Record fields: `tokens` (column 0) and `ner_tags`
    (column `tag_column`, by default the last one). A four-column file (CoNLL-2003: token POS chunk NER) also gets
    `pos_tags` and `chunk_tags` (columns 1 and 2); other widths get each remaining column as `column_<i>`. A
    record's line is the sentence's first line. Raises `LoraforgeError` with file and line for bad bytes, a line
    whose number of columns differs from the file's first token line, a tag column the file does not have, and
    a file with no sentences.
    """
    p = check_file(path)
    if not isinstance(tag_column, int) or isinstance(tag_column, bool) or tag_column == 0:
        raise LoraforgeError(
            f"tag_column is {tag_column!r}; it must be the index of a tag column (1, 2, ... or -1 for the last); "
            "column 0 is the token"
        )
    return _iter_conll(p, str(path), tag_column)


def _iter_conll(p: Path, source: str, tag_column: int) -> Iterator[Record]:
    sentence: list[list[str]] = []
    start = width = width_line = n_records = 0
    for line_no, text in iter_lines(p, source):
        columns = text.split()
        if columns and columns[0] != DOCSTART:
            if not width:
                width, width_line = len(columns), line_no
                _check_tag_column(source, line_no, width, tag_column)
            elif len(columns) != width:
                raise LoraforgeError(
                    f"{source}:{line_no}: {len(columns)} columns, but the file's first token line "
                    f"({width_line}) has {width}; columns are split on whitespace, so a token or tag cannot "
                    "contain a space"
                )
            if not sentence:
                start = line_no
            sentence.append(columns)
        elif sentence:  # a blank line or -DOCSTART- ends the sentence
            n_records += 1
            yield _record(sentence, source, start, tag_column)
            sentence = []
    if sentence:
        n_records += 1
        yield _record(sentence, source, start, tag_column)
    if n_records == 0:
        raise no_records(
            source, "the file is empty or has only blank and -DOCSTART- lines; a CoNLL file has one token and its "
            "tags per line (e.g. `EU NNP I-NP I-ORG`) and a blank line after each sentence"
        )


def _check_tag_column(source: str, line_no: int, width: int, tag_column: int) -> None:
    if width < 2:
        raise LoraforgeError(
            f"{source}:{line_no}: one column only; a CoNLL line needs a token and at least one tag, separated by "
            "whitespace (e.g. `EU NNP I-NP I-ORG`)"
        )
    if not -width <= tag_column < width or tag_column % width == 0:
        raise LoraforgeError(
            f"{source}:{line_no}: tag_column={tag_column} but the lines have {width} columns (0 is the token); "
            f"choose 1 to {width - 1}, or -1 for the last"
        )


def _record(sentence: list[list[str]], source: str, line: int, tag_column: int) -> Record:
    width = len(sentence[0])
    tag = tag_column % width
    fields = {"tokens": [row[0] for row in sentence], "ner_tags": [row[tag] for row in sentence]}
    for i in range(1, width):
        if i != tag:
            name = _CONLL2003[i] if width == 4 and i in _CONLL2003 else f"column_{i}"
            fields[name] = [row[i] for row in sentence]
    return Record(fields=fields, source=source, line=line)
