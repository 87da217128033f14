"""Readers: each file type on real rows (exact fields and lines), each broken file (file:line and the field in the
message), streaming (bounded memory before the first records), and choosing the reader.

The fixtures and their sources are described in `tests/fixtures/readers/README.md`.
"""
from __future__ import annotations

import json
import shutil
import tracemalloc
from itertools import islice
from pathlib import Path

import pytest

import loraforge.data.readers.json_stream as json_stream
from loraforge.data.readers import (
    FILE_FORMATS,
    Record,
    read_conll,
    read_csv,
    read_json,
    read_records,
    read_text,
    read_tsv,
)
from loraforge.errors import LoraforgeError

FIX = Path(__file__).parent / "fixtures" / "readers"
BAD = FIX / "bad"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CUAD_FILES = [
    "BLACKROCKMUNIHOLDINGSINVESTMENTQUALITYFUND_04_07_2020-EX-99.01-JOINT FILING AGREEMENT.txt",
    "CardlyticsInc_20180112_S-1_EX-10.16_11002987_EX-10.16_Maintenance Agreement3.txt",
]


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# --- JSON ---------------------------------------------------------------------------------------------------------


def test_json_array_gives_each_object_at_its_line() -> None:
    records = list(read_records(FIX / "alpaca_zh_en_head.json"))
    assert [r.line for r in records] == [2, 10, 18]
    assert records[1].fields == {
        "en_instruction": "What are the three primary colors?",
        "instruction": "三原色是什么？",
        "en_input": "",
        "input": "",
        "en_output": "The three primary colors are red, blue, and yellow.",
        "output": "三原色是红色、蓝色和黄色。",
    }
    assert records[0].fields["output"] == "1.均衡饮食，确保多吃水果和蔬菜。\n2.定期锻炼，保持身体活跃和强壮。\n3.获得充足的睡眠并保持一致的睡眠时间表。"
    assert records[0].where == f"{FIX / 'alpaca_zh_en_head.json'}:2"


def test_squad_gives_one_record_per_question() -> None:
    records = list(read_json(FIX / "cmrc2018_trial_head.json"))
    assert len(records) == 9  # 4 questions in the first article, 5 in the second
    assert [r.line for r in records] == [10, 20, 30, 40, 62, 72, 82, 92, 102]  # each question's "{"
    first = records[0].fields
    assert {k: v for k, v in first.items() if k != "context"} == {
        "id": "TRIAL_800_QUERY_0",
        "title": "泡泡战士",  # the title comes after the paragraphs in this file
        "question": "生命数耗完即算为什么？",
        "answers": ["踢爆"],
        "answer_starts": [127],
    }
    assert first["context"].startswith("基于《跑跑卡丁车》与《泡泡堂》上所开发的游戏") and len(first["context"]) == 381
    fifth = records[4].fields
    assert (fifth["id"], fifth["title"], fifth["question"]) == ("TRIAL_154_QUERY_0", "尤金袋鼠", "尤金袋鼠分布在哪些地区？")
    assert fifth["answers"] == ["尤金袋鼠分布在澳洲南部岛屿及西岸地区"] and fifth["answer_starts"] == [52]
    for r in records:  # every answer sits at its offset in the context
        for text, start in zip(r.fields["answers"], r.fields["answer_starts"]):
            assert r.fields["context"][start:start + len(text)] == text


def test_squad_v2_keeps_several_answers_and_is_impossible(tmp_path: Path) -> None:
    squad = {"data": [{"title": "Cats", "paragraphs": [{"context": "The cat sat.", "qas": [
        {"id": "a", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0},
                                                        {"text": "cat", "answer_start": 4}], "is_impossible": False},
        {"id": "b", "question": "Who flew?", "answers": [], "is_impossible": True},
    ]}]}], "version": "v2.0"}
    records = list(read_json(write(tmp_path, "squad2.json", json.dumps(squad).encode())))
    assert [r.fields["answers"] for r in records] == [["The cat", "cat"], []]
    assert [r.fields["answer_starts"] for r in records] == [[0, 4], []]
    assert [r.fields["is_impossible"] for r in records] == [False, True]


def test_pubmedqa_gives_one_record_per_pmid() -> None:
    records = list(read_json(FIX / "pubmedqa_pqal_head.json"))
    assert len(records) == 3
    assert [(r.line, r.fields["id"], r.fields["label"]) for r in records] == [
        (2, "10808977", "yes"), (43, "23831910", "yes"), (68, "17113061", "no")
    ]
    raw = json.loads((FIX / "pubmedqa_pqal_head.json").read_text(encoding="utf-8"))
    for r in records:
        source = raw[r.fields["id"]]
        assert r.fields == {
            "id": r.fields["id"],
            "question": source["QUESTION"],
            "context": "\n".join(source["CONTEXTS"]),  # the abstract's paragraphs, one per line
            "long_answer": source["LONG_ANSWER"],
            "label": source["final_decision"],
        }
    question = "Can tailored interventions increase mammography use among HMO women?"
    assert records[0].fields["question"] == question
    assert records[0].fields["context"].startswith("Telephone counseling and tailored print communications")
    assert records[2].fields["long_answer"] == (
        "Genetic variants identified in the present study may be insufficient to promote early carotid "
        "atherosclerosis."
    )


@pytest.mark.parametrize("window", [3, 64])
def test_json_reading_does_not_depend_on_the_read_window(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    # Tiny windows cut keys, strings, numbers and UTF-8 characters in two: the records and lines must not change.
    expected = {name: [(r.line, r.fields) for r in read_json(FIX / name)]
                for name in ("cmrc2018_trial_head.json", "pubmedqa_pqal_head.json", "alpaca_zh_en_head.json")}
    monkeypatch.setattr(json_stream, "READ_BYTES", window)
    for name, records in expected.items():
        assert [(r.line, r.fields) for r in read_json(FIX / name)] == records
    assert expected["cmrc2018_trial_head.json"][0][1]["answer_starts"] == [127]


# --- CSV and TSV --------------------------------------------------------------------------------------------------


def test_csv_rows_start_at_their_physical_line() -> None:
    records = list(read_records(FIX / "e2e_train_head.csv"))
    assert [r.line for r in records] == [2, 3, 4, 6]  # the row on line 4 has a quoted newline
    assert records[0].fields == {
        "mr": "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], "
              "near[Café Adriatic]",
        "ref": "The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30.",
    }
    assert records[2].fields["ref"] == (
        "Giraffe is a coffee shop providing take a service the high price range. It is located near The Bakers."
        "\r\n  This coffee shop is a high customer rating"
    )
    assert records[3].fields["mr"].startswith("name[The Punter], eatType[coffee shop], food[French]")


def test_tsv_keeps_fields_as_written() -> None:
    records = list(read_records(FIX / "sst2_train_head.tsv"))
    assert [(r.line, r.fields) for r in records[:2]] == [
        (2, {"sentence": "hide new secretions from the parental units ", "label": "0"}),
        (3, {"sentence": "contains no wit , only labored gags ", "label": "0"}),
    ]
    assert [r.fields["label"] for r in records] == ["0", "0", "1", "0"]


def test_tsv_quotes_are_text_and_delimiter_can_be_overridden(tmp_path: Path) -> None:
    tsv = write(tmp_path, "q.tsv", b'sentence\tlabel\n" a quoted start\t1\n')
    assert next(read_tsv(tsv)).fields == {"sentence": '" a quoted start', "label": "1"}
    semi = write(tmp_path, "semi.csv", '\ufeffmr;ref\nname[Aromi];"Aromi; a pub."\n'.encode())
    assert next(read_records(semi, delimiter=";")).fields == {"mr": "name[Aromi]", "ref": "Aromi; a pub."}


# --- plain text ---------------------------------------------------------------------------------------------------


def test_text_folder_gives_one_record_per_file_in_name_order() -> None:
    records = list(read_records(FIX / "cuad_txt"))
    assert [Path(r.source).name for r in records] == CUAD_FILES
    assert all(r.line == 1 for r in records)
    for r, name in zip(records, CUAD_FILES):
        assert r.fields == {"text": (FIX / "cuad_txt" / name).read_text(encoding="utf-8")}
    assert records[0].fields["text"].startswith("JOINT FILING AGREEMENT\n\nPursuant to and in accordance with")
    assert records[0].source == str(FIX / "cuad_txt" / CUAD_FILES[0])


def test_big_text_file_is_cut_at_paragraphs_and_nothing_is_lost(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} is about clause {i}.\nIt has two lines.\n\n" for i in range(30)]
    path = write(tmp_path, "big.txt", "".join(paragraphs).encode())
    records = list(read_text(path, chunk_bytes=100))
    assert all(r.fields["text"].endswith("\n\n") for r in records)  # every cut is at a blank line
    assert "".join(r.fields["text"] for r in records) == path.read_text()
    assert [r.line for r in records[:3]] == [1, 7, 13]  # each piece is two ~50-byte paragraphs of 3 lines
    assert len(records) == 15


def test_text_cuts_a_line_longer_than_the_chunk_without_breaking_characters(tmp_path: Path) -> None:
    text = "é" * 500 + "\nend\n"  # 1,005 bytes; the readline limit falls inside a 2-byte character
    records = list(read_text(write(tmp_path, "long.txt", text.encode()), chunk_bytes=101))
    assert "".join(r.fields["text"] for r in records) == text
    assert max(len(r.fields["text"].encode()) for r in records) < 3 * 101
    assert {r.line for r in records} == {1}  # all pieces start on line 1


# --- CoNLL --------------------------------------------------------------------------------------------------------


def test_conll_gives_one_record_per_sentence() -> None:
    records = list(read_records(FIX / "eng_train_head.conll"))
    assert [r.line for r in records] == [3, 13, 16, 21]  # -DOCSTART- lines are not sentences
    assert records[0].fields == {
        "tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        "ner_tags": ["I-ORG", "O", "I-MISC", "O", "O", "O", "I-MISC", "O", "O"],
        "pos_tags": ["NNP", "VBZ", "JJ", "NN", "TO", "VB", "JJ", "NN", "."],
        "chunk_tags": ["I-NP", "I-VP", "I-NP", "I-NP", "I-VP", "I-VP", "I-NP", "I-NP", "O"],
    }
    assert records[3].fields["tokens"] == ["Rare", "Hendrix", "song", "draft", "sells", "for", "almost", "$",
                                           "17,000", "."]
    assert records[3].fields["ner_tags"][1] == "I-PER"


def test_conll_tag_column_and_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "eng.train"  # the real name has no known suffix
    shutil.copyfile(FIX / "eng_train_head.conll", path)
    with pytest.raises(LoraforgeError, match=r'eng\.train: cannot tell the format.*-DOCSTART-.*format="conll"'):
        read_records(path)
    record = next(read_records(path, format="conll", tag_column=1))
    assert record.fields["ner_tags"][:3] == ["NNP", "VBZ", "JJ"]
    assert record.fields["chunk_tags"][:2] == ["I-NP", "I-VP"] and record.fields["column_3"][0] == "I-ORG"
    two = write(tmp_path, "two.conll", b"Peter B-PER\nBlackburn I-PER\n")
    assert next(read_conll(two)).fields == {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}
    with pytest.raises(LoraforgeError, match=r"two\.conll:1: tag_column=2 but the lines have 2 columns"):
        next(read_conll(two, tag_column=2))


# --- broken files -------------------------------------------------------------------------------------------------

BAD_FILES = {
    # file in tests/fixtures/readers/bad: (the line in the message (None: whole file), words it must contain)
    "truncated_array.json": (3, ["cut short", "starts at line 3"]),
    "missing_comma.json": (3, ['expected "," or "]"', "column 3"]),
    "array_of_strings.json": (2, ["JSON object", "string"]),
    "latin1.json": (2, ["UTF-8", "0xe9", "column 16"]),
    "squad_no_question.json": (3, ['"question"', '"id", "answers"']),
    "pubmedqa_no_contexts.json": (3, ['"CONTEXTS"', '"2"', '"QUESTION", "final_decision"']),
    "empty.json": (None, ["no records"]),
    "latin1.csv": (2, ["UTF-8", "0xe9", "column 9"]),
    "short_row.csv": (3, ['column "ref" missing', '"mr", "ref"', "1 field "]),
    "long_row.csv": (2, ["3 fields", '"mr", "ref"', "double quotes"]),
    "tab_separated.csv": (1, ["'sentence\\tlabel'", "tab-separated", 'format="tsv"']),
    "unclosed_quote.csv": (2, ["never closed"]),
    "duplicate_column.csv": (1, ['"mr" appears twice']),
    "header_only.csv": (None, ["no records", "only a header"]),
    "latin1.txt": (3, ["UTF-8", "0xe9", "column 4"]),
    "empty.txt": (None, ["no text"]),
    "ragged.conll": (4, ["3 columns", "(1) has 4"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_message_names_file_line_and_field(name: str) -> None:
    line, words = BAD_FILES[name]
    path = BAD / name
    with pytest.raises(LoraforgeError) as info:
        list(read_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("name", "content", "line", "words"),
    [
        ("cut.json", b'[\n  {"text": "a"},\n', 3, ["cut short", "Expecting value"]),
        ("open.json", b'[\n  {"text": "a"}\n', 3, ["file ends inside the array that starts at line 1", "cut short"]),
        ("comma.json", b'[{"text": "a"},\n]', 2, ["trailing comma"]),
        ("lines.json", b'{"text": "a"}\n{"text": "b"}\n', 1, ['key "text"', ".jsonl"]),
        ("two.json", b'[{"text": "a"}]\n[{"text": "b"}]\n', 2, ["more JSON after", "jsonl"]),
        ("squad.json", b'{"version": "1", "data": [{"title": "T"}]}', 1, ['no "paragraphs"', '"title"']),
        ("answers.json", b'{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": '
                         b'[{"text": "c"}]}]}]}]}', 1, ['"answer_start"']),
        ("cut.csv", b"mr,ref\na,b\nc,d", None, []),  # no newline at the end is fine
        ("cut_utf8.txt", b"caf\xc3", 1, ["UTF-8", "0xc3", "column 4"]),
    ],
)
def test_more_bad_json_and_edges(tmp_path: Path, name: str, content: bytes, line: int | None, words: list) -> None:
    path = write(tmp_path, name, content)
    if not words:
        assert [r.fields for r in read_records(path)] == [{"mr": "a", "ref": "b"}, {"mr": "c", "ref": "d"}]
        return
    with pytest.raises(LoraforgeError) as info:
        list(read_records(path))
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
def test_a_one_megabyte_line_is_read(tmp_path: Path, suffix: str) -> None:
    big = "x" * 1_000_000 + "é"
    content = {
        ".jsonl": json.dumps({"text": big}, ensure_ascii=False) + "\n",
        ".json": json.dumps([{"text": "a"}, {"text": big}], ensure_ascii=False),
        ".csv": f"text,n\n{big},1\n",
        ".tsv": f"text\tn\n{big}\t1\n",
        ".txt": big,
    }[suffix]
    records = list(read_records(write(tmp_path, "big" + suffix, content.encode())))
    assert records[-1].fields["text"] == big


# --- streaming ----------------------------------------------------------------------------------------------------

ROW = "the cat sat on the mat, and then it sat on the mat again " * 3
STREAM_FILES = {
    "big.jsonl": (json.dumps({"text": ROW}) + "\n", "", ""),
    "big.json": (json.dumps({"text": ROW}) + ",\n", "[\n", "{}]\n"),
    "big.csv": (f'"{ROW}",1\n', "text,n\n", ""),
    "big.tsv": (f"{ROW}\t1\n", "text\tn\n", ""),
    "big.txt": (ROW + "\n\n", "", ""),
    "big.conll": ("cat NN\n" * 20 + "\n", "", ""),
}


@pytest.mark.parametrize("name", list(STREAM_FILES))
def test_first_records_come_before_the_file_is_read(tmp_path: Path, name: str) -> None:
    row, head, tail = STREAM_FILES[name]
    path = tmp_path / name
    block = row.encode() * (1_000_000 // len(row))
    with path.open("wb") as f:
        f.write(head.encode())
        for _ in range(50):  # ~50 MB
            f.write(block)
        f.write(tail.encode())
    tracemalloc.start()
    try:
        n_read = 0
        for record in islice(read_records(path), 10):  # one record held at a time, as a training loader would
            assert isinstance(record, Record) and record.fields
            n_read += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n_read == 10
    # A text record is up to ~1 MiB (TEXT_CHUNK_BYTES); the others are a few hundred bytes.
    assert peak < 5_000_000, f"{name}: {peak:,} bytes to read 10 records of a {path.stat().st_size:,}-byte file"


# --- choosing the reader ------------------------------------------------------------------------------------------


def test_unknown_suffix_lists_the_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "data.parquet", b"PAR1")
    with pytest.raises(LoraforgeError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f'{path}: cannot tell the format of ".parquet" files'), message
    assert all(name in message for name in FILE_FORMATS) and ".jsonl" in message
    with pytest.raises(LoraforgeError, match="unknown data format 'parquet'; choose one of: jsonl, json"):
        read_records(path, format="parquet")


def test_problems_before_the_first_record_are_reported_at_call_time(tmp_path: Path) -> None:
    with pytest.raises(LoraforgeError, match=r"nope\.csv: file not found"):
        read_records(tmp_path / "nope.csv")
    with pytest.raises(LoraforgeError, match=r"a\.json: delimiter applies to csv and tsv files only"):
        read_records(write(tmp_path, "a.json", b"[]"), delimiter=";")
    with pytest.raises(LoraforgeError, match=r"tag_column applies to conll files only"):
        read_records(FIX / "e2e_train_head.csv", tag_column=1)
    with pytest.raises(LoraforgeError, match="delimiter is ';;'"):
        read_csv(FIX / "e2e_train_head.csv", delimiter=";;")
    folder = tmp_path / "tables"
    folder.mkdir()
    write(folder, "x.csv", b"a\n1\n")
    with pytest.raises(LoraforgeError, match=r"tables: no \.txt files in this folder \(found only: \.csv\)"):
        read_records(folder)


def test_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "train.data"
    shutil.copyfile(FIX / "sst2_train_head.tsv", path)
    assert next(read_records(path, format="tsv")).fields["label"] == "0"
    notes = write(tmp_path, "notes.md", b"# Title\n\nSome text.\n")
    assert next(read_records(notes, format="text")).fields == {"text": "# Title\n\nSome text.\n"}


# --- the real datasets, when this machine has them ----------------------------------------------------------------

REAL = [
    ("cmrc2018/cmrc2018_trial.json", None, 1_002),
    ("pubmedqa/ori_pqal.json", None, 1_000),
    ("alpaca_zh_en/alpaca_chinese_part_0.json", None, 1_000),
    ("e2e/trainset.csv", None, 42_061),
    ("sst2/train.tsv", None, 67_349),
    ("conll2003/eng.train", "conll", 14_041),
    ("legal_cuad/full_contract_txt", None, 101),
]


@pytest.mark.parametrize(("rel", "fmt", "count"), REAL, ids=[r[0] for r in REAL])
def test_real_dataset_record_counts_match_their_source_md(rel: str, fmt: str | None, count: int) -> None:
    assert sum(1 for _ in read_records(SHARED / rel, format=fmt)) == count
