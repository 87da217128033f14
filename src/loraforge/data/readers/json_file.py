"""JSON files (one value per file), streamed. The shape is told by the content, not the file name:

- a top-level array of objects: one record per object, as is (Alpaca's `alpaca_data.json`);
- SQuAD (v1.1/v2.0, also CMRC 2018): `{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`,
  one record per question;
- PubMedQA (`ori_pqal.json`): `{"<PMID>": {"QUESTION", "CONTEXTS", "final_decision", "LONG_ANSWER", ...}}`,
  one record per PMID.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.data.readers.base import Record, check_file, json_type, no_records
from loraforge.data.readers.json_stream import JsonCursor
from loraforge.errors import LoraforgeError

_SHAPES = (
    'a top-level array of objects [{...}, ...], SQuAD-style {"data": [{"paragraphs": [...]}]} or PubMedQA-style '
    '{"<id>": {"QUESTION": ..., "CONTEXTS": [...]}}'
)
_SQUAD_KEYS = ("data", "version")
_PUBMEDQA_KEYS = ("QUESTION", "CONTEXTS")


def read_json(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Stream the records of a `.json` file holding one of the shapes above.

    Array records are the objects as parsed; their line is where the object's `{` is. SQuAD records have fields
    `id`, `title`, `context`, `question`, `answers` (list of answer texts), `answer_starts` (list of ints), plus
    `is_impossible` when the file has it (SQuAD 2.0); their line is where the question's `{` is. PubMedQA records
    have `id` (the PMID), `question`, `context` (the CONTEXTS joined by newlines), `long_answer` and `label`
    (final_decision; left out when the file has none, as in the unlabelled PQA-U); their line is the PMID's.
    Raises `LoraforgeError` with the file and line for bad bytes, broken or cut-short JSON, and missing fields.
    """
    p = check_file(path)
    return _iter_json(p, str(path))


def _iter_json(p: Path, source: str) -> Iterator[Record]:
    n_records = 0
    with p.open("rb") as f:
        cur = JsonCursor(f, source)
        first = cur.peek()
        if first == "[":
            records = _array_records(cur)
        elif first == "{":
            records = _object_records(cur)
        elif not first:
            raise no_records(source, f"the file is empty; a .json file holds {_SHAPES}")
        else:
            raise cur.error(f"the file starts with {first!r}; a .json file must hold {_SHAPES}")
        for record in records:
            n_records += 1
            yield record
        cur.expect_end()
    if n_records == 0:
        raise no_records(source, f"its array or object is empty; a .json file holds {_SHAPES}")


def _array_records(cur: JsonCursor) -> Iterator[Record]:
    for line in cur.array_items("the top-level array"):
        value = cur.value()
        if not isinstance(value, dict):
            raise LoraforgeError(
                f"{cur.source}:{line}: expected a JSON object ({{...}}) as array element but found a JSON "
                f"{json_type(value)}; the array must hold one object per record, e.g. [{{\"text\": \"...\"}}]"
            )
        yield Record(fields=value, source=cur.source, line=line)


def _object_records(cur: JsonCursor) -> Iterator[Record]:
    shape = ""
    keys = []
    for key, line in cur.object_members("the top-level object"):
        if not shape:
            shape = "squad" if key in _SQUAD_KEYS else "pubmedqa"
        if shape == "pubmedqa":
            yield _pubmedqa_record(cur, key, line)
            continue
        keys.append(key)
        if key == "data":
            yield from _squad_articles(cur)
        else:
            cur.value()  # "version" and the like
    if shape == "squad" and "data" not in keys:
        found = ", ".join(f'"{k}"' for k in keys)
        raise LoraforgeError(f'{cur.source}: SQuAD-style file without a "data" array; top-level keys: {found}')


def _pubmedqa_record(cur: JsonCursor, key: str, line: int) -> Record:
    value = cur.value()
    where = f"{cur.source}:{line}"
    if not isinstance(value, dict) or not any(k in value for k in _PUBMEDQA_KEYS):
        raise LoraforgeError(
            f'{where}: unknown JSON shape: a top-level object whose key "{key}" holds a JSON {json_type(value)}; '
            f"a .json file must hold {_SHAPES}; for one object per line, name the file .jsonl"
        )
    for name in _PUBMEDQA_KEYS:
        if name not in value:
            found = ", ".join(f'"{k}"' for k in value)
            raise LoraforgeError(f'{where}: PubMedQA record "{key}" has no field "{name}"; fields found: {found}')
    contexts = value["CONTEXTS"]
    if isinstance(contexts, str):
        contexts = [contexts]
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise LoraforgeError(f'{where}: PubMedQA record "{key}": field "CONTEXTS" must be a list of strings')
    fields: dict[str, Any] = {"id": key, "question": value["QUESTION"], "context": "\n".join(contexts)}
    if "LONG_ANSWER" in value:
        fields["long_answer"] = value["LONG_ANSWER"]
    if "final_decision" in value:
        fields["label"] = value["final_decision"]
    return Record(fields=fields, source=cur.source, line=line)


def _squad_articles(cur: JsonCursor) -> Iterator[Record]:
    """The records of SQuAD's `data` array; an article's questions come out once the whole article is read,
    since its title may follow its paragraphs."""
    for article_line in cur.array_items('"data"'):
        title: Any = ""
        paragraphs: list[tuple[str, list[tuple[int, Any]]]] = []
        keys = []
        for key, _ in cur.object_members('"data"'):
            keys.append(key)
            if key == "paragraphs":
                paragraphs = _squad_paragraphs(cur)
            elif key == "title":
                title = cur.value()
            else:
                cur.value()
        if "paragraphs" not in keys:
            found = ", ".join(f'"{k}"' for k in keys) or "none"
            raise LoraforgeError(
                f'{cur.source}:{article_line}: SQuAD article has no "paragraphs"; keys found: {found}'
            )
        for context, qas in paragraphs:
            for line, qa in qas:
                yield _squad_record(cur.source, line, qa, context, title)


def _squad_paragraphs(cur: JsonCursor) -> list[tuple[str, list[tuple[int, Any]]]]:
    paragraphs = []
    for line in cur.array_items('"paragraphs"'):
        context: Any = None
        qas: list[tuple[int, Any]] = []
        keys = []
        for key, _ in cur.object_members('"paragraphs"'):
            keys.append(key)
            if key == "qas":
                qas = [(q_line, cur.value()) for q_line in cur.array_items('"qas"')]
            elif key == "context":
                context = cur.value()
            else:
                cur.value()
        for name in ("context", "qas"):
            if name not in keys:
                found = ", ".join(f'"{k}"' for k in keys) or "none"
                raise LoraforgeError(f'{cur.source}:{line}: SQuAD paragraph has no "{name}"; keys found: {found}')
        if not isinstance(context, str):
            raise LoraforgeError(f'{cur.source}:{line}: SQuAD field "context" is a JSON {json_type(context)}, '
                                 "not a string")
        paragraphs.append((context, qas))
    return paragraphs


def _squad_record(source: str, line: int, qa: Any, context: str, title: Any) -> Record:
    where = f"{source}:{line}"
    if not isinstance(qa, dict):
        raise LoraforgeError(f'{where}: a SQuAD "qas" entry must be an object, not a JSON {json_type(qa)}')
    for name in ("question", "answers"):
        if name not in qa:
            found = ", ".join(f'"{k}"' for k in qa) or "none"
            raise LoraforgeError(f'{where}: SQuAD question has no "{name}" field; fields found: {found}')
    answers = qa["answers"]
    if not isinstance(answers, list):
        raise LoraforgeError(f'{where}: SQuAD field "answers" is a JSON {json_type(answers)}, not an array')
    for answer in answers:
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise LoraforgeError(
                f'{where}: each of "answers" needs "text" and "answer_start", e.g. '
                f'{{"text": "...", "answer_start": 0}}; found {answer!r:.80}'
            )
    fields: dict[str, Any] = {
        "id": qa.get("id", ""),
        "title": title,
        "context": context,
        "question": qa["question"],
        "answers": [a["text"] for a in answers],
        "answer_starts": [a["answer_start"] for a in answers],
    }
    if "is_impossible" in qa:
        fields["is_impossible"] = qa["is_impossible"]
    return Record(fields=fields, source=source, line=line)
