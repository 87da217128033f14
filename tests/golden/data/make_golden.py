"""Regenerate tests/golden/data/*.json: exact input_ids and labels of every data format and task recipe.

Run from the repository root:  .venv/bin/python tests/golden/data/make_golden.py
Only rerun it when a change to the numbers is intended (a new prompt wording, a new template, a tokenization
change), and say why in the commit: tests/test_recipes.py and tests/test_chat.py compare against these files exactly.

The tokenizer is word-level (BERT's normalizer and pre-tokenizer: words, single punctuation marks, single CJK
characters; case kept) over a
vocabulary written to vocab.json: the special tokens, then every word of the golden texts in order of first
appearance. Each golden case stores its tokens next to the ids, so every number can be checked by eye.
Both this script and the tests import CASES, `tiny_tokenizer` and `compute` from here; the JSON pins the output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from loraforge.data import (
    RECIPES,
    Example,
    Record,
    TokenizedExample,
    chunk_documents,
    document_ids,
    to_example,
    tokenize_example,
)

HERE = Path(__file__).resolve().parent
VOCAB_FILE = HERE / "vocab.json"
GOLDEN_FILES = {"formats": HERE / "formats.json", "recipes": HERE / "recipes.json"}
COMMAND = ".venv/bin/python tests/golden/data/make_golden.py"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MAX_LENGTH = 512

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2-Instruct's own template (ChatML with a default system turn), copied from its tokenizer_config.json.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"none": None, "chatml": CHATML, "smollm2": SMOLLM2_TEMPLATE}

ALPACA_ZH_EN = {  # the shape of alpaca_zh_en/alpaca_chinese_part_*.json (English fields prefixed en_)
    "en_instruction": "Name the pub.", "instruction": "说出酒吧的名字。",
    "en_input": "name[The Vaults]", "input": "name[The Vaults]",
    "en_output": "The Vaults.", "output": "酒吧叫The Vaults。",
}  # fmt: skip
EN_COLUMNS = {"instruction": "en_instruction", "input": "en_input", "output": "en_output"}
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name the pub."},
    {"role": "assistant", "content": "The Vaults."},
    {"role": "user", "content": "Is it near a café?"},
    {"role": "assistant", "content": "Yes, Café Adriatic."},
]
SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Name the pub."},
    {"from": "gpt", "value": "The Vaults."},
    {"from": "human", "value": "Is it near a café?"},
    {"from": "gpt", "value": "Yes, Café Adriatic."},
]
DOCUMENTS = ["the cat sat on the mat.", "THIS AGREEMENT is made by the parties.", "End."]
CHUNK_LENGTH = 8

# One record per recipe, in the shape its reader produces (see data/readers), short but real-looking.
RECIPE_RECORDS: dict[str, dict[str, Any]] = {
    "sst2": {"sentence": "it 's a charming and often affecting journey . ", "label": "1"},
    "pubmedqa": {
        "id": "21645374", "question": "Do mitochondria play a role in remodelling lace plant leaves?",
        "context": "Programmed cell death shapes lace plant leaves.\nMitochondria change as it goes on.",
        "long_answer": "Mitochondria play a role.", "label": "yes",
    },
    # IOB1 as in eng.train: entities start with I-; B-MISC marks a second MISC right after the first
    "conll2003": {
        "tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "French", "lamb", "."],
        "ner_tags": ["I-ORG", "O", "I-MISC", "O", "O", "O", "I-MISC", "B-MISC", "O", "O"],
        "pos_tags": ["NNP", "VBZ", "JJ", "NN", "TO", "VB", "JJ", "JJ", "NN", "."],
    },
    "dialogsum": {
        "fname": "dev_0", "topic": "health",
        "dialogue": "#Person1#: How are you doing today?\n#Person2#: I ' Ve been having trouble breathing.",
        "summary": "#Person2# has trouble breathing.",
    },
    "scitldr": {
        "paper_id": "SysEexbRb", "source": ["We study loss scaling.", "It makes training faster."],
        "target": ["Adaptive loss scaling makes training faster.", "A loss scaling method."],
    },
    "squad": {
        "id": "q1", "title": "The Vaults", "context": "The Vaults is a pub near Café Adriatic.",
        "question": "What is The Vaults?", "answers": ["a pub", "pub"], "answer_starts": [13, 15],
    },
    "cmrc2018": {
        "id": "TRIAL_800_QUERY_0", "title": "泡泡堂", "context": "生命数耗完即算为踢爆。",
        "question": "生命数耗完即算为什么？", "answers": ["踢爆"], "answer_starts": [8],
    },
    "e2e": {
        "mr": "name[The Vaults], eatType[pub], near[Café Adriatic]", "ref": "The Vaults is a pub near Café Adriatic.",
    },
}  # fmt: skip


def record(fields: dict[str, Any], line: int = 1) -> Record:
    return Record(fields=fields, source="golden.jsonl", line=line)


def format_cases() -> dict[str, dict[str, Any]]:
    """name -> how to build it: a format, its record, template, columns (chunks: the documents)."""
    return {
        "text": {"fmt": "text", "fields": {"text": "the cat sat on the mat."}, "template": "none"},
        "text_chunks": {"fmt": "text_chunks", "documents": DOCUMENTS, "template": "none"},
        "instruction_columns_alpaca": {"fmt": "instruction", "fields": ALPACA_ZH_EN, "template": "none",
                                       "columns": EN_COLUMNS},
        "instruction_columns_chat": {"fmt": "instruction", "fields": ALPACA_ZH_EN, "template": "chatml",
                                     "columns": EN_COLUMNS},
        "instruction_zh_chat": {"fmt": "instruction", "fields": ALPACA_ZH_EN, "template": "chatml"},
        "messages_two_turns": {"fmt": "messages", "fields": {"messages": TWO_TURNS}, "template": "chatml"},
        "messages_default_system": {"fmt": "messages", "fields": {"messages": TWO_TURNS[1:]}, "template": "smollm2"},
        "messages_system_field": {"fmt": "messages", "fields": {"system": "Be brief.", "messages": TWO_TURNS[1:3]},
                                  "template": "chatml"},
        "sharegpt": {"fmt": "sharegpt", "fields": {"conversations": SHAREGPT}, "template": "chatml"},
    }  # fmt: skip


def recipe_cases() -> dict[str, dict[str, Any]]:
    cases = {}
    for name, fields in RECIPE_RECORDS.items():
        for template in ("chatml", "none"):
            cases[f"{name}_{template}"] = {"recipe": name, "fields": fields, "template": template}
    return cases


def tiny_tokenizer(vocab: list[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level over `vocab`; like Llama it puts <s> in front by itself (so plain text examples get a BOS)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    # Spaces around each CJK character, then split on spaces and punctuation; case and accents are kept.
    tok.normalizer = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                                lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def example_of(case: dict[str, Any], tok: PreTrainedTokenizerFast) -> Example:
    if "recipe" in case:
        return RECIPES[case["recipe"]].to_example(record(case["fields"]), tok)
    return to_example(record(case["fields"]), case["fmt"], chat_template_tokenizer=tok, columns=case.get("columns"))


def compute(case: dict[str, Any], vocab: list[str]) -> list[TokenizedExample]:
    """The tokenized example(s) of a case (several only for text_chunks)."""
    tok = tiny_tokenizer(vocab, TEMPLATES[case["template"]])
    if case.get("fmt") == "text_chunks":
        return list(chunk_documents((document_ids(d, tok) for d in case["documents"]), CHUNK_LENGTH))
    return [tokenize_example(example_of(case, tok), tok, MAX_LENGTH)]


def build_vocab() -> list[str]:
    """Special tokens, then the words of every golden text in order of first appearance."""
    words: dict[str, None] = {}
    backend = tiny_tokenizer(SPECIALS).backend_tokenizer
    for case in [*format_cases().values(), *recipe_cases().values()]:
        tok = tiny_tokenizer(SPECIALS, TEMPLATES[case["template"]])
        texts = case["documents"] if "documents" in case else [example_of(case, tok).text]
        for text in texts:
            for piece in _split_specials(text):
                normal = backend.normalizer.normalize_str(piece)
                words.update((w, None) for w, _ in backend.pre_tokenizer.pre_tokenize_str(normal))
    return SPECIALS + [w for w in words if w not in SPECIALS]


def _split_specials(text: str) -> list[str]:
    pieces = [text]
    for special in SPECIALS:
        pieces = [p for piece in pieces for p in piece.split(special)]
    return pieces


def golden(cases: dict[str, dict[str, Any]], vocab: list[str]) -> dict[str, Any]:
    out = {}
    for name, case in cases.items():
        results = compute(case, vocab)
        out[name] = [
            {"tokens": [vocab[i] for i in r.input_ids], "input_ids": r.input_ids, "labels": r.labels} for r in results
        ]
    return {"command": COMMAND, "max_length": MAX_LENGTH, "cases": out}


def dumps(data: dict[str, Any]) -> str:
    """JSON with one line per list, so a case reads as three aligned lines: tokens, input_ids, labels."""
    def line(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = ["{", f' "command": {line(data["command"])},', f' "max_length": {data["max_length"]},', ' "cases": {']
    for n, (name, results) in enumerate(data["cases"].items()):
        lines.append(f"  {line(name)}: [")
        for m, result in enumerate(results):
            fields = ",\n".join(f"    {line(k)}: {line(v)}" for k, v in result.items())
            lines.append("   {\n" + fields + "\n   }" + ("," if m < len(results) - 1 else ""))
        lines.append("  ]" + ("," if n < len(data["cases"]) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    vocab = build_vocab()
    VOCAB_FILE.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    for kind, cases in (("formats", format_cases()), ("recipes", recipe_cases())):
        GOLDEN_FILES[kind].write_text(dumps(golden(cases, vocab)), encoding="utf-8")
        print(f"wrote {GOLDEN_FILES[kind]} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
