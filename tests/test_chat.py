"""Chat records (`messages`, ShareGPT): golden ids, every assistant turn learned and nothing else, segments that
concatenate to the template's own render, and clear errors for templates we cannot split and for bad records.

Golden numbers: tests/golden/data/formats.json, made by tests/golden/data/make_golden.py.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from loraforge.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    Record,
    detect_format,
    load_examples,
    make_instruction_example,
    to_example,
    tokenize_example,
)
from loraforge.errors import LoraforgeError

GOLDEN_DIR = Path(__file__).parent / "golden" / "data"
X = IGNORE_INDEX


def _golden_module() -> Any:
    spec = importlib.util.spec_from_file_location("golden_data_cases", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


G = _golden_module()
VOCAB = json.loads((GOLDEN_DIR / "vocab.json").read_text(encoding="utf-8"))
GOLDEN = json.loads((GOLDEN_DIR / "formats.json").read_text(encoding="utf-8"))
CHAT_CASES = [n for n, c in G.format_cases().items() if c["fmt"] in ("messages", "sharegpt")]


def tok(template: str | None = G.CHATML) -> Any:
    return G.tiny_tokenizer(VOCAB, template)


def rec(fields: dict, line: int = 1) -> Record:
    return Record(fields=fields, source="chat.jsonl", line=line)


def learned_tokens(ids: list[int], labels: list[int]) -> list[str]:
    return [VOCAB[i] for i, label in zip(ids, labels) if label != X]


# --- golden -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHAT_CASES)
def test_golden_chat(name: str) -> None:
    [got] = G.compute(G.format_cases()[name], VOCAB)
    [want] = GOLDEN["cases"][name]
    assert (got.input_ids, got.labels) == (want["input_ids"], want["labels"])


def test_two_assistant_turns_are_learned_with_their_end_of_turn() -> None:
    [case] = GOLDEN["cases"]["messages_two_turns"]
    assert learned_tokens(case["input_ids"], case["labels"]) == [
        "The", "Vaults", ".", "<|im_end|>", "Yes", ",", "Café", "Adriatic", ".", "<|im_end|>",
    ]  # fmt: skip
    # the system turn, both user turns and both role headers are read, not learned
    first_learned = case["labels"].index(VOCAB.index("The"))
    assert case["tokens"][first_learned - 2:first_learned] == ["<|im_start|>", "assistant"]


def test_sharegpt_equals_the_same_conversation_as_messages() -> None:
    assert GOLDEN["cases"]["sharegpt"] == GOLDEN["cases"]["messages_two_turns"]


def test_default_system_turn_of_the_template_is_read_not_learned() -> None:
    [case] = GOLDEN["cases"]["messages_default_system"]
    assert case["tokens"][:4] == ["<|im_start|>", "system", "You", "are"]
    assert learned_tokens(case["input_ids"], case["labels"])[:4] == ["The", "Vaults", ".", "<|im_end|>"]


def test_system_field_becomes_the_first_message() -> None:
    [case] = GOLDEN["cases"]["messages_system_field"]
    assert case["tokens"][:5] == ["<|im_start|>", "system", "Be", "brief", "."]


# --- the segments are the template's own render ---------------------------------------------------------------------


@pytest.mark.parametrize("template", [G.CHATML, G.SMOLLM2_TEMPLATE])
def test_segments_concatenate_to_the_full_render(template: str) -> None:
    t = tok(template)
    example = to_example(rec({"messages": G.TWO_TURNS}), "messages", chat_template_tokenizer=t)
    full = t.apply_chat_template(G.TWO_TURNS, tokenize=False)
    assert example.text == full.rstrip()
    assert example.learned_text == ["The Vaults.<|im_end|>", "Yes, Café Adriatic.<|im_end|>"]
    assert not example.add_special_tokens
    ids = t.apply_chat_template(G.TWO_TURNS, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenize_example(example, t, 512).input_ids == list(ids)  # the final "\n" is a space to this tokenizer


def test_one_turn_chat_equals_the_instruction_example() -> None:
    t = tok(G.SMOLLM2_TEMPLATE)
    messages = [{"role": "user", "content": "Name the pub."}, {"role": "assistant", "content": "The Vaults."}]
    chat = to_example(rec({"messages": messages}), "messages", chat_template_tokenizer=t)
    assert chat == make_instruction_example("Name the pub.", "", "The Vaults.", t)


def test_a_conversation_may_end_with_a_user_turn_which_is_not_learned() -> None:
    messages = G.TWO_TURNS[:4]
    example = to_example(rec({"messages": messages}), "messages", chat_template_tokenizer=tok())
    assert example.learned_text == ["The Vaults.<|im_end|>"]
    assert example.segments[-1].text == "\n<|im_start|>user\nIs it near a café?<|im_end|>\n"


# Other template shapes: Llama-3-like (headers, content trimmed), one that writes no end-of-turn marker, one with
# no generation prompt (the role header is part of the assistant message).
LLAMA3_LIKE = (
    "{{ '<s>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] | trim }}"
    "{{ '</s>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)
NO_END_MARKER = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
NO_GENERATION_PROMPT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
)


def test_header_template_with_trimmed_content() -> None:
    messages = [{"role": "user", "content": "Name the pub. "}, {"role": "assistant", "content": " The Vaults. "}]
    example = to_example(rec({"messages": messages}), "messages", chat_template_tokenizer=tok(LLAMA3_LIKE))
    assert example.learned_text == ["The Vaults.</s>"]
    assert example.prompt.endswith("<|im_start|>assistant<|im_end|>\n\n")


def test_template_without_end_marker_learns_eos() -> None:
    example = to_example(rec({"messages": G.TWO_TURNS[1:3]}), "messages", chat_template_tokenizer=tok(NO_END_MARKER))
    assert example.learned_text == ["The Vaults.</s>"]
    assert example.prompt == "user: Name the pub.\nassistant: "


def test_template_without_generation_prompt_keeps_the_header_unlearned() -> None:
    t = tok(NO_GENERATION_PROMPT)
    example = to_example(rec({"messages": G.TWO_TURNS}), "messages", chat_template_tokenizer=t)
    assert example.learned_text == ["The Vaults.<|im_end|>", "Yes, Café Adriatic.<|im_end|>"]
    assert example.text == t.apply_chat_template(G.TWO_TURNS, tokenize=False)


# --- errors -------------------------------------------------------------------------------------------------------

NOT_PREFIX_STABLE = (  # says how many messages there are at the top: every prefix renders a different first line
    "{{ messages | length }} messages\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)
CHANGES_CONTENT = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}"
RAISES = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"


@pytest.mark.parametrize(
    ("template", "words"),
    [
        (None, ["chat.jsonl:3: chat records need a tokenizer with a chat template", "CHATML_TEMPLATE"]),
        (NOT_PREFIX_STABLE, ["chat.jsonl:3: the tokenizer's chat template is not prefix-stable", "first 2 messages"]),
        (CHANGES_CONTENT, ["chat.jsonl:3: the chat template changes the text of message 2 (assistant)"]),
        (RAISES, ["chat.jsonl:3: the chat template cannot render this conversation", "roles must alternate"]),
    ],
)
def test_templates_we_cannot_split_are_named(template: str | None, words: list[str]) -> None:
    with pytest.raises(LoraforgeError) as info:
        to_example(rec({"messages": G.TWO_TURNS}, line=3), "messages", chat_template_tokenizer=tok(template))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_chatml_fallback_template_is_offered() -> None:
    t = tok(None)
    t.chat_template = CHATML_TEMPLATE
    example = to_example(rec({"messages": G.TWO_TURNS}), "messages", chat_template_tokenizer=t)
    assert example.text == t.apply_chat_template(G.TWO_TURNS, tokenize=False).rstrip()


USER = {"role": "user", "content": "Name the pub."}
BAD_RECORDS = {
    # name: (fields, words the message must hold)
    "not an array": ({"messages": "hi"}, ['field "messages" is a JSON string, not an array']),
    "empty array": ({"messages": []}, ['field "messages" is an empty array']),
    "item not an object": ({"messages": ["hi"]}, ['field "messages" item 0 is a JSON string']),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]},
                     ["item 0 has \"role\": 'bot'", "system, user, assistant"]),
    "no content": ({"messages": [USER, {"role": "assistant"}]}, ['item 1 has no string "content" (found a JSON null)']),
    "empty answer": ({"messages": [USER, {"role": "assistant", "content": " "}]},
                     ['item 1 is an assistant turn with an empty "content"']),
    "no assistant": ({"messages": [USER]}, ['field "messages" has no assistant turn']),
    "system not a string": ({"system": 3, "messages": [USER]}, ['field "system" is a JSON number']),
    "sharegpt role": ({"conversations": [{"from": "bing", "value": "x"}]},
                      ["item 0 has \"from\": 'bing'", "human, user, gpt"]),
    "sharegpt value": ({"conversations": [{"from": "human", "text": "x"}]}, ['item 0 has no string "value"']),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_chat_records_name_file_line_and_field(name: str) -> None:
    fields, words = BAD_RECORDS[name]
    with pytest.raises(LoraforgeError) as info:
        to_example(rec(fields, line=4), detect_format(rec(fields)), chat_template_tokenizer=tok())
    message = str(info.value)
    assert message.startswith("chat.jsonl:4: field "), message
    for word in words:
        assert word in message, message


def test_detect_chat_formats() -> None:
    assert detect_format(rec({"messages": [], "text": "x"})) == "messages"
    assert detect_format(rec({"conversations": [], "id": 1})) == "sharegpt"


# --- load_examples ------------------------------------------------------------------------------------------------


def test_load_chat_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    lines = [{"messages": G.TWO_TURNS}, {"conversations": G.SHAREGPT}, {"messages": [USER]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    examples, stats = load_examples(path, tok(), 512, on_bad_record="skip")
    want = GOLDEN["cases"]["messages_two_turns"][0]
    assert [(e.input_ids, e.labels) for e in examples] == [(want["input_ids"], want["labels"])] * 2
    assert stats.formats == {"messages": 1, "sharegpt": 1} and stats.skipped == 1
    assert stats.skip_reasons[0].startswith(f"{path}:3: field \"messages\" has no assistant turn")
    with pytest.raises(LoraforgeError, match=r"chat\.jsonl:1: nothing left to learn: the conversation before the"):
        load_examples(path, tok(), 10)
    with pytest.raises(LoraforgeError, match=r"chat\.jsonl:1: chat records need a tokenizer with a chat template"):
        load_examples(path, tok(None), 512)
