"""CSV and TSV files with a header row: one record per row, keyed by the header's column names."""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

from loraforge.data.readers.base import Record, check_file, iter_lines, no_records
from loraforge.errors import LoraforgeError

_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
_HINTS = {",": 'format="csv" (or delimiter=",")', "\t": 'format="tsv" (or delimiter="\\t")'}
# The csv module refuses fields over 128 KiB by default; a long document in one cell is valid data.
_FIELD_LIMIT = 2**31 - 1


def read_csv(path: str | os.PathLike[str], *, delimiter: str = ",") -> Iterator[Record]:
    """Stream the rows of a CSV file (RFC 4180: fields in double quotes may hold the delimiter, `""` and newlines).

    The first row is the header; each later row is one record `{column name: text}` (all values are strings,
    as written), whose line is the physical line the row starts on. Blank lines are skipped. Raises
    `LoraforgeError` with file and line for: bad bytes, a header with an empty or repeated name, a one-column
    header that contains another delimiter (the wrong delimiter), a row with too many or too few fields, a
    quote that is never closed, and a file with no rows.
    """
    return _read_delimited(path, delimiter, quoted=True)


def read_tsv(path: str | os.PathLike[str], *, delimiter: str = "\t") -> Iterator[Record]:
    """Stream the rows of a TSV file, as `read_csv` does, except that quotes are plain text (as in GLUE's TSVs:
    a field can hold neither the delimiter nor a newline)."""
    return _read_delimited(path, delimiter, quoted=False)


def _read_delimited(path: str | os.PathLike[str], delimiter: str, *, quoted: bool) -> Iterator[Record]:
    p = check_file(path)
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
        raise LoraforgeError(f"delimiter is {delimiter!r}; it must be one character such as \",\", \"\\t\" or \";\"")
    return _iter_rows(p, str(path), delimiter, quoted)


def _iter_rows(p: Path, source: str, delimiter: str, quoted: bool) -> Iterator[Record]:
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    last_line = 0  # the physical line the csv module read last

    def lines() -> Iterator[str]:
        nonlocal last_line
        for line_no, text in iter_lines(p, source):
            last_line = line_no
            yield text

    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    rows = csv.reader(lines(), delimiter=delimiter, quoting=quoting, strict=quoted)
    columns: list[str] = []
    header_line = n_records = 0
    while True:
        start = last_line + 1
        try:
            row = next(rows, None)
        except csv.Error as e:
            raise _csv_error(e, source, start, last_line) from None
        if row is None:
            break
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if not columns:
            columns, header_line = _check_header(row, source, start, delimiter), start
            continue
        if len(row) != len(columns):
            raise _width_error(row, columns, source, start, header_line, delimiter)
        n_records += 1
        yield Record(fields=dict(zip(columns, row)), source=source, line=start)
    if n_records == 0:
        what = "the file holds only a header" if columns else "the file is empty or has only blank lines"
        raise no_records(source, f"{what}; put the column names on line 1 and one record per row after it")


def _check_header(row: list[str], source: str, line: int, delimiter: str) -> list[str]:
    columns = [name.strip() for name in row]
    if len(columns) == 1:
        for other, name in _NAMES.items():
            if other != delimiter and other in columns[0]:
                hint = _HINTS.get(other, f'delimiter="{other}"')
                raise LoraforgeError(
                    f"{source}:{line}: the header has one column, {columns[0]!r}, which contains {name}s: the file "
                    f"looks {name}-separated, but it was read as {_NAMES.get(delimiter, repr(delimiter))}-separated; "
                    f"read it with {hint}"
                )
    for i, name in enumerate(columns):
        if not name:
            raise LoraforgeError(
                f"{source}:{line}: column {i + 1} of the header has no name; every column needs one "
                f"(columns: {_quoted(columns)})"
            )
        if name in columns[:i]:
            raise LoraforgeError(
                f'{source}:{line}: column "{name}" appears twice in the header (columns {columns.index(name) + 1} '
                f"and {i + 1}); rename one"
            )
    return columns


def _width_error(
    row: list[str], columns: list[str], source: str, line: int, header_line: int, delimiter: str
) -> LoraforgeError:
    name = _NAMES.get(delimiter, repr(delimiter))
    if len(row) < len(columns):
        missing = columns[len(row):]
        return LoraforgeError(
            f"{source}:{line}: row has {_fields(len(row))} but the header (line {header_line}) has {len(columns)}: "
            f"column{'s' if len(missing) > 1 else ''} {_quoted(missing)} missing; columns: {_quoted(columns)}; "
            f"look for a missing {name} or a field cut short"
        )
    return LoraforgeError(
        f"{source}:{line}: row has {len(row)} fields but the header (line {header_line}) has {len(columns)} "
        f"({_quoted(columns)}); a field that contains a {name} must be in double quotes"
    )


def _csv_error(e: csv.Error, source: str, start: int, last_line: int) -> LoraforgeError:
    if "unexpected end of data" in str(e):
        return LoraforgeError(
            f"{source}:{start}: a double-quoted field that starts on this row is never closed (the file ends "
            'inside it); look for a stray " and write a quote inside a quoted field as ""'
        )
    return LoraforgeError(
        f"{source}:{last_line}: not valid CSV ({e}); a field with a quote in it must be quoted whole, with each "
        'inner quote doubled: "say ""hi"""'
    )


def _fields(n: int) -> str:
    return f"{n} field" if n == 1 else f"{n} fields"


def _quoted(names: list[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)
