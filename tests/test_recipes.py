"""Formats and task recipes: golden ids and labels, label masks checked against the target, parsers that read the
target back, IOB1 -> BIO, errors that name file:line and field, and `load_examples` wiring it all.

Golden numbers are in tests/golden/data/*.json, made by tests/golden/data/make_golden.py (which also defines the
cases and the tiny word-level tokenizer; its vocabulary is tests/golden/data/vocab.json).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from loraforge.data import (
    IGNORE_INDEX,
    METRICS,
    RECIPES,
    Example,
    Record,
    collate,
    detect_format,
    end_of_turn,
    iob1_to_bio,
    load_examples,
    prompt_ids,
    read_records,
    tokenize_example,
)
from loraforge.data.ner import parse_entities, render_entities, tag_spans
from loraforge.data.recipes import Classification, parse_label
from loraforge.errors import LoraforgeError

GOLDEN_DIR = Path(__file__).parent / "golden" / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the repo, as in CI
X = IGNORE_INDEX


def _golden_module() -> Any:
    spec = importlib.util.spec_from_file_location("golden_data_cases", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _golden_module()
VOCAB = json.loads((GOLDEN_DIR / "vocab.json").read_text(encoding="utf-8"))
FORMAT_GOLDEN = json.loads((GOLDEN_DIR / "formats.json").read_text(encoding="utf-8"))
RECIPE_GOLDEN = json.loads((GOLDEN_DIR / "recipes.json").read_text(encoding="utf-8"))
PLAIN_FORMATS = [n for n, c in G.format_cases().items() if c["fmt"] not in ("messages", "sharegpt")]


def tok(template: str = "none") -> Any:
    return G.tiny_tokenizer(VOCAB, G.TEMPLATES[template])


def rec(fields: dict, line: int = 1, source: str = "data.jsonl") -> Record:
    return Record(fields=fields, source=source, line=line)


def as_lists(results: list) -> list[dict]:
    return [{"input_ids": r.input_ids, "labels": r.labels} for r in results]


def pinned(golden: dict, name: str) -> list[dict]:
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in golden["cases"][name]]


# --- golden ids and labels ----------------------------------------------------------------------------------------


def test_golden_files_come_from_the_script() -> None:
    for golden in (FORMAT_GOLDEN, RECIPE_GOLDEN):
        assert golden["command"] == G.COMMAND and golden["max_length"] == G.MAX_LENGTH
    assert set(RECIPE_GOLDEN["cases"]) == set(G.recipe_cases())
    assert set(FORMAT_GOLDEN["cases"]) == set(G.format_cases())
    assert VOCAB == G.build_vocab()  # the cases did not change behind the goldens' back
    assert "<unk>" not in json.dumps([FORMAT_GOLDEN, RECIPE_GOLDEN])  # every golden token is a real word


@pytest.mark.parametrize("name", PLAIN_FORMATS)
def test_golden_format(name: str) -> None:
    assert as_lists(G.compute(G.format_cases()[name], VOCAB)) == pinned(FORMAT_GOLDEN, name)


@pytest.mark.parametrize("name", list(G.recipe_cases()))
def test_golden_recipe(name: str) -> None:
    assert as_lists(G.compute(G.recipe_cases()[name], VOCAB)) == pinned(RECIPE_GOLDEN, name)


@pytest.mark.parametrize("name", list(G.recipe_cases()))
def test_recipe_learns_exactly_the_target_and_its_end(name: str) -> None:
    """Labels are -100 on every prompt and template token, and equal the ids on target + end-of-turn (or EOS)."""
    case = G.recipe_cases()[name]
    recipe, record, t = RECIPES[case["recipe"]], rec(case["fields"]), tok(case["template"])
    got = tokenize_example(recipe.to_example(record, t), t, 512)
    chat = case["template"] != "none" and recipe.prompt_style != "plain"  # a plain recipe never uses the template
    end = [t.convert_tokens_to_ids(end_of_turn(t))] if chat else [t.eos_token_id]
    target = t(recipe.target(record), add_special_tokens=False)["input_ids"] + end
    prompt = recipe.encode_prompt(record, t)
    assert got.input_ids == prompt + target
    assert got.labels == [X] * len(prompt) + target
    assert prompt[0] == (4 if chat else t.bos_token_id)  # <|im_start|> or the BOS


@pytest.mark.parametrize("template", ["none", "chatml"])
def test_plain_recipe_prompt_is_the_input_and_a_newline(template: str) -> None:
    """e2e's "plain" prompt: BOS, the MR, a newline; then the reference and EOS. Its instruction style still works."""
    record, t = rec(G.RECIPE_RECORDS["e2e"]), tok(template)
    plain = RECIPES["e2e"]
    assert plain.prompt_style == "plain" and plain.plain_prompt(record) == G.RECIPE_RECORDS["e2e"]["mr"] + "\n"
    ids = tokenize_example(plain.to_example(record, t), t, 512).input_ids
    assert ids == [t.bos_token_id] + t(plain.plain_prompt(record) + plain.target(record), add_special_tokens=False)[
        "input_ids"] + [t.eos_token_id]
    instructed = dataclasses.replace(plain, prompt_style="instruction")
    assert len(instructed.encode_prompt(record, t)) > len(plain.encode_prompt(record, t)) + 10
    with pytest.raises(LoraforgeError, match='prompt_style is "chat"'):
        dataclasses.replace(plain, prompt_style="chat")


def test_golden_text_and_chunks_are_all_learned_but_bos() -> None:
    [text] = FORMAT_GOLDEN["cases"]["text"]
    assert text["tokens"][0] == "<s>" and text["labels"] == [X] + text["input_ids"][1:]
    chunks = FORMAT_GOLDEN["cases"]["text_chunks"]
    assert [len(c["input_ids"]) for c in chunks] == [8, 8, 7]
    stream = [i for c in chunks for i in c["input_ids"]]
    labels = [label for c in chunks for label in c["labels"]]
    # <s> doc </s> <s> doc </s> ...: every document whole and in order, documents joined by their EOS
    assert [VOCAB[i] for i in stream].count("</s>") == len(G.DOCUMENTS)
    assert labels == [X if i == 2 else i for i in stream]


def test_padding_is_never_learned() -> None:
    results = [G.compute(G.recipe_cases()[n], VOCAB)[0] for n in ("sst2_chatml", "conll2003_chatml")]
    batch = collate(results, pad_id=0)
    short = len(results[0].input_ids)
    assert batch["labels"][0, short:].eq(X).all() and batch["input_ids"][0, short:].eq(0).all()
    assert batch["labels"][0, :short].tolist() == results[0].labels


def test_column_mapping_reads_the_english_alpaca_fields() -> None:
    [mapped] = FORMAT_GOLDEN["cases"]["instruction_columns_chat"]
    learned = [t for t, label in zip(mapped["tokens"], mapped["labels"]) if label != X]
    assert learned == ["The", "Vaults", ".", "<|im_end|>"]  # en_output, not the Chinese output
    assert "说" not in mapped["tokens"]
    [zh] = FORMAT_GOLDEN["cases"]["instruction_zh_chat"]
    learned = [t for t, label in zip(zh["tokens"], zh["labels"]) if label != X]
    assert learned == ["酒", "吧", "叫", "The", "Vaults", "。", "<|im_end|>"]


# --- parse_prediction reads the target back -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(G.RECIPE_RECORDS))
def test_parse_prediction_round_trips_the_target(name: str) -> None:
    recipe, record = RECIPES[name], rec(G.RECIPE_RECORDS[name])
    parsed = recipe.parse_prediction(recipe.target(record), record)
    reference = recipe.reference(record)
    assert parsed == (reference[0] if isinstance(reference, list) and recipe.metric != "seqeval" else reference)


def test_recipes_name_known_metrics() -> None:
    assert {r.metric for r in RECIPES.values()} == set(METRICS)
    from loraforge import metrics

    assert all(metrics.get_metric(name) for name in METRICS)  # every name resolves to a metric function


EXPECTED_TARGETS = {
    "sst2": ("positive", "positive"),
    "pubmedqa": ("yes", "yes"),
    "conll2003": ("EU: ORG; German: MISC; British: MISC; French: MISC",
                  ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "B-MISC", "O", "O"]),
    "dialogsum": ("#Person2# has trouble breathing.", ["#Person2# has trouble breathing."]),
    "scitldr": ("Adaptive loss scaling makes training faster.",
                ["Adaptive loss scaling makes training faster.", "A loss scaling method."]),
    "squad": ("a pub", ["a pub", "pub"]),
    "cmrc2018": ("踢爆", ["踢爆"]),
    "e2e": ("The Vaults is a pub near Café Adriatic.", ["The Vaults is a pub near Café Adriatic."]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPECTED_TARGETS))
def test_target_and_reference(name: str) -> None:
    record = rec(G.RECIPE_RECORDS[name])
    assert (RECIPES[name].target(record), RECIPES[name].reference(record)) == EXPECTED_TARGETS[name]


def test_prompts_hold_the_record_text() -> None:
    assert RECIPES["sst2"].prompt(rec(G.RECIPE_RECORDS["sst2"])) == (
        "Is the sentiment of this movie review negative or positive? Answer with one word.",
        "it 's a charming and often affecting journey .",
    )
    instruction, input_ = RECIPES["pubmedqa"].prompt(rec(G.RECIPE_RECORDS["pubmedqa"]))
    assert instruction.endswith("yes, no or maybe.")
    assert input_.startswith("Context: Programmed cell death")
    assert input_.endswith("\n\nQuestion: Do mitochondria play a role in remodelling lace plant leaves?")
    scitldr = RECIPES["scitldr"].prompt(rec(G.RECIPE_RECORDS["scitldr"]))[1]
    assert scitldr == "We study loss scaling. It makes training faster."
    cmrc = RECIPES["cmrc2018"].prompt(rec(G.RECIPE_RECORDS["cmrc2018"]))[1]
    assert cmrc == "文章：生命数耗完即算为踢爆。\n\n问题：生命数耗完即算为什么？"


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("positive", "positive"), (" Positive.", "positive"), ("negative<|im_end|>", "negative"),
        ("It is negative.", "negative"), ("positive, not negative", "positive"),
        ("both negative and positive parts", ""), ("neutral", ""), ("", ""), ("positively", ""),
    ],
)  # fmt: skip
def test_parse_label(text: str, label: str) -> None:
    assert parse_label(text, ["negative", "positive"]) == label


def test_parse_label_prefers_the_longest_name_it_starts_with() -> None:
    assert parse_label("very positive!", ["positive", "very positive"]) == "very positive"


TOKENS = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]


@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ("none", ["O"] * 9),
        ("EU: ORG; German: MISC; British: MISC", ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]),
        ("British: MISC; EU: ORG", ["B-ORG", "O", "O", "O", "O", "O", "B-MISC", "O", "O"]),  # out of order
        ("EU: ORG\nGerman: PERSONA; France: LOC", ["B-ORG"] + ["O"] * 8),  # unknown type, words not in the sentence
        ("British lamb: MISC", ["O"] * 6 + ["B-MISC", "I-MISC", "O"]),
        ("EU : ORG;German:MISC", ["B-ORG", "O", "B-MISC"] + ["O"] * 6),  # loose spacing
        ("The EU rejects it.", ["O"] * 9),
    ],
)
def test_parse_entities(text: str, tags: list[str]) -> None:
    assert parse_entities(text, TOKENS, ["PER", "ORG", "LOC", "MISC"]) == tags


def test_entity_list_finds_a_repeated_word_in_order() -> None:
    tokens = ["Paris", "fans", "cheered", "Paris", "Saint-Germain", "in", "Paris"]
    tags = ["B-LOC", "O", "O", "B-ORG", "I-ORG", "O", "B-LOC"]
    text = render_entities(tokens, tag_spans(tags))
    assert text == "Paris: LOC; Paris Saint-Germain: ORG; Paris: LOC"
    assert parse_entities(text, tokens, ["LOC", "ORG"]) == tags


def test_entity_words_may_hold_separators() -> None:
    tokens = ["Sun", ";", "Micro", ":", "Inc", "wins"]
    tags = ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "O"]
    text = render_entities(tokens, tag_spans(tags))
    assert text == "Sun ; Micro : Inc: ORG"
    assert parse_entities(text, tokens, ["ORG"]) == tags


@pytest.mark.parametrize(
    ("iob1", "bio"),
    [
        (["I-ORG", "O", "I-MISC", "I-MISC"], ["B-ORG", "O", "B-MISC", "I-MISC"]),
        (["I-LOC", "B-LOC", "I-LOC"], ["B-LOC", "B-LOC", "I-LOC"]),  # two entities side by side
        (["I-PER", "I-ORG"], ["B-PER", "B-ORG"]),  # a type change starts an entity
        (["B-MISC", "I-MISC"], ["B-MISC", "I-MISC"]),  # BIO passes through unchanged
        (["O", "O"], ["O", "O"]),
    ],
)
def test_iob1_to_bio(iob1: list[str], bio: list[str]) -> None:
    assert iob1_to_bio(iob1) == bio
    assert iob1_to_bio(bio) == bio


def test_bio_and_iob1_data_give_the_same_example() -> None:
    iob1 = rec(G.RECIPE_RECORDS["conll2003"])
    bio = rec({**iob1.fields, "ner_tags": iob1_to_bio(iob1.fields["ner_tags"])})
    ner = RECIPES["conll2003"]
    assert ner.to_example(iob1, tok("chatml")) == ner.to_example(bio, tok("chatml"))
    assert ner.reference(iob1) == ner.reference(bio)


# --- errors name file:line and field ------------------------------------------------------------------------------


RECIPE_ERRORS = {
    # name: (recipe, fields, words the message must hold)
    "unknown label": ("sst2", {"sentence": "great", "label": "2"},
                      ['field "label" is \'2\'', "allowed: 0 (negative), 1 (positive)"]),
    "label of wrong type": ("sst2", {"sentence": "great", "label": [1]}, ['field "label"', "allowed"]),
    "missing text": ("sst2", {"label": "1"}, ['field "sentence" (as "text") is missing', '"sentence", "label"']),
    "empty text": ("e2e", {"mr": "name[X]", "ref": "  "}, ['field "ref" is empty']),
    "missing answers": ("squad", {"context": "c", "question": "q"}, ['field "answers" is missing']),
    "no answer": ("squad", {"context": "c", "question": "q", "answers": [""]}, ['field "answers" has no non-empty']),
    "unknown pubmedqa label": ("pubmedqa", {"question": "q", "context": "c", "label": "perhaps"},
                               ["'perhaps'", "yes, no, maybe"]),
    "bad tag": ("conll2003", {"tokens": ["a"], "ner_tags": ["X-PER"]}, ['field "ner_tags" tag 0 is "X-PER"']),
    "unknown type": ("conll2003", {"tokens": ["a"], "ner_tags": ["B-GPE"]}, ['"B-GPE", a type not in PER, ORG']),
    "tag count": ("conll2003", {"tokens": ["a", "b"], "ner_tags": ["O"]}, ["has 1 tags for 2 tokens"]),
    "token with space": ("conll2003", {"tokens": ["a b"], "ner_tags": ["O"]}, ['field "tokens" item 0']),
    "source not text": ("scitldr", {"source": 3, "target": ["t"]}, ['field "source" is a JSON number']),
    "empty target list": ("dialogsum", {"dialogue": "d", "summary": []}, ['field "summary" (as "target") is empty']),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RECIPE_ERRORS))
def test_recipe_errors_name_file_line_and_field(name: str) -> None:
    recipe, fields, words = RECIPE_ERRORS[name]
    with pytest.raises(LoraforgeError) as info:
        RECIPES[recipe].to_example(rec(fields, line=7, source="train.tsv"), tok())
    message = str(info.value)
    assert message.startswith("train.tsv:7: field "), message
    for word in words:
        assert word in message, message


def test_label_names_are_configurable() -> None:
    stars = dataclasses.replace(RECIPES["sst2"], labels={0: "bad", 1: "good"})
    record = rec({"sentence": "great", "label": 1})
    assert stars.target(record) == "good"
    assert stars.prompt(record)[0].startswith("Is the sentiment of this movie review bad or good?")
    assert stars.target(rec({"sentence": "great", "label": "bad"})) == "bad"  # the name itself is accepted
    with pytest.raises(LoraforgeError, match="distinct"):
        Classification(name="x", instruction="", labels={0: "yes", 1: "yes"})


def test_columns_are_checked_against_the_recipe() -> None:
    mapped = RECIPES["e2e"].with_columns({"mr": "meaning", "ref": "text"})
    assert mapped.target(rec({"meaning": "name[X]", "text": "X."})) == "X."
    with pytest.raises(LoraforgeError, match=r'columns: the e2e recipe has no field "reference"; map one of: mr, ref'):
        RECIPES["e2e"].with_columns({"reference": "text"})


# --- load_examples ------------------------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_examples_with_a_recipe_on_a_tsv(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n")
    examples, stats = load_examples(path, tok("chatml"), 512, recipe="sst2")
    assert as_lists(examples) == pinned(RECIPE_GOLDEN, "sst2_chatml")
    assert stats.formats == {"recipe:sst2": 1} and (stats.used, stats.skipped) == (1, 0)


def test_load_examples_unknown_label_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nbad\tneg\n")
    with pytest.raises(LoraforgeError, match=rf"^{path}:3: field \"label\" is 'neg'.*allowed: 0 \(negative\)"):
        load_examples(path, tok(), 512, recipe="sst2")
    _, stats = load_examples(path, tok(), 512, recipe="sst2", on_bad_record="skip")
    assert (stats.used, stats.skipped) == (1, 1)


def test_load_examples_conll_recipe(tmp_path: Path) -> None:
    sentence = G.RECIPE_RECORDS["conll2003"]
    columns = zip(sentence["tokens"], sentence["pos_tags"], sentence["ner_tags"])
    lines = ["-DOCSTART- -X- O O", ""] + [f"{w} {p} I-NP {t}" for w, p, t in columns]
    path = write(tmp_path, "eng.train", "\n".join(lines) + "\n")
    examples, _ = load_examples(path, tok("chatml"), 512, recipe="conll2003", file_format="conll")
    assert as_lists(examples) == pinned(RECIPE_GOLDEN, "conll2003_chatml")


def test_load_examples_with_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "alpaca.jsonl", json.dumps(G.ALPACA_ZH_EN, ensure_ascii=False) + "\n")
    examples, stats = load_examples(path, tok("chatml"), 512, columns=G.EN_COLUMNS)
    assert as_lists(examples) == pinned(FORMAT_GOLDEN, "instruction_columns_chat")
    assert stats.formats == {"instruction": 1}
    with pytest.raises(LoraforgeError, match=r'columns: the "instruction" format has no field "response"'):
        load_examples(path, tok(), 512, fmt="instruction", columns={"response": "en_output"})
    with pytest.raises(LoraforgeError, match=r'^.*alpaca\.jsonl:1: field "en_outptu" \(as "output"\) is missing'):
        load_examples(path, tok(), 512, columns={**G.EN_COLUMNS, "output": "en_outptu"})


def test_detect_format_after_renaming() -> None:
    assert detect_format(rec({"q": "a", "a": "b"}), {"instruction": "q", "output": "a"}) == "instruction"
    assert detect_format(rec({"msgs": []}), {"messages": "msgs"}) == "messages"


def test_text_chunks_and_lm_recipe_chunk_the_stream(tmp_path: Path) -> None:
    path = write(tmp_path, "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in G.DOCUMENTS))
    examples, stats = load_examples(path, tok(), G.CHUNK_LENGTH, fmt="text_chunks")
    assert as_lists(examples) == pinned(FORMAT_GOLDEN, "text_chunks")
    assert (stats.records_read, stats.used, stats.truncated, stats.chunks) == (3, 3, 0, 3)
    assert stats.tokens == 23 and stats.target_tokens == 20  # 3 BOS are not learned
    assert "in 3 chunks" in stats.summary()
    again, _ = load_examples(path, tok(), G.CHUNK_LENGTH, recipe="lm")
    assert as_lists(again) == as_lists(examples)
    one_per_record, stats = load_examples(path, tok(), G.CHUNK_LENGTH)  # the default: one example per record
    assert len(one_per_record) == 3 and stats.truncated == 2 and stats.chunks == 0  # first two lose their </s>


def test_text_chunks_drop_only_a_one_token_tail(tmp_path: Path) -> None:
    path = write(tmp_path, "docs.jsonl", json.dumps({"text": "the cat sat on the mat."}) + "\n")
    examples, _ = load_examples(path, tok(), 4, fmt="text_chunks")  # <s> the cat sat | on the mat . | </s>
    assert [len(e.input_ids) for e in examples] == [4, 4]
    with pytest.raises(LoraforgeError, match=r'docs2\.jsonl:2: field "text" is empty'):
        load_examples(write(tmp_path, "docs2.jsonl", '{"text": "a"}\n{"text": " "}\n'), tok(), 4, fmt="text_chunks")


def test_text_folder_as_lm(tmp_path: Path) -> None:
    folder = tmp_path / "contracts"
    folder.mkdir()
    for n, doc in enumerate(G.DOCUMENTS):
        (folder / f"{n}.txt").write_text(doc, encoding="utf-8")
    examples, stats = load_examples(folder, tok(), G.CHUNK_LENGTH, recipe="lm")
    assert as_lists(examples) == pinned(FORMAT_GOLDEN, "text_chunks") and stats.used == 3


def test_bad_choices_are_user_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "the cat"}\n')
    with pytest.raises(LoraforgeError, match='unknown recipe "sentiment"; choose one of: sst2, pubmedqa'):
        load_examples(path, tok(), 16, recipe="sentiment")
    with pytest.raises(LoraforgeError, match="not both"):
        load_examples(path, tok(), 16, recipe="lm", fmt="text")
    with pytest.raises(LoraforgeError, match='unknown format "txt"; choose one of: text, text_chunks'):
        load_examples(path, tok(), 16, fmt="txt")


def test_recipe_prompt_too_long_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "dev.jsonl", json.dumps(G.RECIPE_RECORDS["e2e"]) + "\n")
    with pytest.raises(LoraforgeError, match=r"dev\.jsonl:1: nothing left to learn: the e2e recipe's prompt fills"):
        load_examples(path, tok(), 8, recipe="e2e")


def test_prompt_ids_of_a_multi_segment_example() -> None:
    t = tok()
    example = Example((("the cat", False), ("sat", True), ("on the", False), ("mat", True)))
    assert example.prompt == "the cat" and example.response == "saton themat" and example.learned_text == ["sat", "mat"]
    got = tokenize_example(example, t, 64)
    # <s> the cat | sat | on the | mat | </s>
    assert got.input_ids == [2, 6, 7, 8, 9, 6, 10, 3]
    assert got.labels == [X, X, X, 8, X, X, 10, 3]
    assert prompt_ids(example, t) == [2, 6, 7]


def test_example_drops_empty_segments() -> None:
    assert Example.from_prompt("", "a") == Example((("a", True),))
    assert Example((("a", 1), ("", 0))).segments == (("a", True),)


# --- the real datasets, when they are here ------------------------------------------------------------------------

REAL = {
    "sst2": ("sst2/dev.tsv", None),
    "conll2003": ("conll2003/eng.testa", "conll"),
    "dialogsum": ("dialogsum/dialogsum.dev.jsonl", None),
    "scitldr": ("scitldr/dev.jsonl", None),
    "cmrc2018": ("cmrc2018/cmrc2018_dev.json", None),
    "pubmedqa": ("pubmedqa/ori_pqal.json", None),
    "e2e": ("e2e/devset.csv", None),
}


@pytest.mark.parametrize("name", list(REAL))
def test_every_real_dev_record_round_trips(name: str) -> None:
    path, file_format = REAL[name]
    recipe, n = RECIPES[name], 0
    for record in read_records(SHARED_DATA / path, file_format):
        reference = recipe.reference(record)
        parsed = recipe.parse_prediction(recipe.target(record), record)
        assert parsed == reference or (recipe.metric != "seqeval" and parsed in reference), record.where
        n += 1
    assert n > 400
