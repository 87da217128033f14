"""Formats: a `Record` -> an `Example`, the text the model reads and, segment by segment, what it learns.

Accepted record shapes (extra keys are ignored; `columns` renames fields, e.g. `{"output": "en_output"}`):

- `{"text": ...}` as `text`: plain language-model text, one example per record (cut at `max_length`), all learned.
- `{"text": ...}` as `text_chunks` (never detected, ask for it): the documents of a file joined with EOS into one
  token stream and cut into `max_length` chunks, all learned; for domain adaptation on long documents. The
  chunking is done by `load_examples` over the whole file (`tokenize.chunk_documents`), not record by record.
- `{"instruction": ..., "input": ... (optional), "output": ...}`: instruction tuning; only `output` is learned.
- `{"prompt": ..., "completion": ...}`: treated like an instruction record with `prompt` as the instruction.
- `{"messages": [{"role", "content"}...]}` and ShareGPT `{"conversations": [{"from", "value"}...]}`: chat, every
  assistant turn learned (see `chat.py`); these need the tokenizer's chat template.

Instruction prompts are rendered with the tokenizer's chat template when it has one, else with the Alpaca template.
`render_prompt` is the one place that rendering happens, so generation can rebuild the exact training prompt.
Task recipes (`recipes.py`) build their prompts through it too.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from loraforge.data.chat import (
    conversation_example,
    end_of_turn,
    has_chat_template,
    messages_from_record,
    render_chat,
)
from loraforge.data.example import Example, Fields
from loraforge.data.readers import Record
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "CHUNKED_FORMATS", "FORMATS", "FORMAT_FIELDS", "Example",
    "detect_format", "end_of_turn", "has_chat_template", "make_instruction_example", "render_prompt", "to_example",
]  # fmt: skip

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "text_chunks": ("text",),
    "instruction": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
}
"""Format name -> the fields it reads (the names `columns` may map)."""
FORMATS = tuple(FORMAT_FIELDS)
CHUNKED_FORMATS = frozenset({"text_chunks"})
"""Formats whose examples are chunks of a file-wide token stream rather than one per record."""

_SHAPES = (
    '{"text": ...}, {"instruction": ..., "input": ... (optional), "output": ...}, '
    '{"prompt": ..., "completion": ...}, {"messages": [{"role": ..., "content": ...}, ...]} '
    'or {"conversations": [{"from": ..., "value": ...}, ...]}'
)
_NEEDS = {
    "text": 'text records need a non-empty "text"',
    "text_chunks": 'text records need a non-empty "text"',
    "instruction": 'instruction records need "instruction" and "output" (optional "input")',
    "prompt_completion": 'prompt/completion records need "prompt" and "completion"',
    "messages": 'chat records need "messages": an array of {"role": "system"|"user"|"assistant", "content": ...}',
    "sharegpt": 'ShareGPT records need "conversations": an array of {"from": "system"|"human"|"gpt", "value": ...}',
}


def detect_format(record: Record, columns: Mapping[str, str] | None = None) -> str:
    """Name the shape of `record`, one of `FORMATS` (never `text_chunks`: chunking is asked for, not guessed).

    A complete shape wins (so the Alpaca dataset, which also carries a rendered "text" column, reads as
    instructions); otherwise a partial one is named so that `to_example` can say which field is missing.
    `columns` (our name -> the record's) is applied first.
    """
    columns = columns or {}
    keys = (record.fields.keys() - set(columns.values())) | {k for k, v in columns.items() if v in record.fields}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    found = ", ".join(f'"{k}"' for k in record.fields) or "none"
    raise LoraforgeError(
        f"{record.where}: cannot tell what kind of record this is (fields: {found}); "
        f"use one of these shapes: {_SHAPES}, map your field names with columns=..., or use a task recipe"
    )


def to_example(
    record: Record,
    fmt: str,
    *,
    chat_template_tokenizer: PreTrainedTokenizerBase | None = None,
    columns: Mapping[str, str] | None = None,
) -> Example:
    """Turn `record` of shape `fmt` into an `Example`, checking its fields.

    With `chat_template_tokenizer` set and its `chat_template` non-empty, instruction-like records are rendered as
    a one-turn chat; otherwise with the Alpaca template. Plain text records ignore the tokenizer; chat records
    (`messages`, `sharegpt`) need it. `columns` maps our field names to the record's.
    """
    if fmt not in FORMAT_FIELDS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    fields = Fields(record, _NEEDS[fmt], columns or {})
    if fmt in ("text", "text_chunks"):
        return Example.from_prompt("", fields.text("text"))
    if fmt == "instruction":
        instruction, output = fields.text("instruction"), fields.text("output")
        return make_instruction_example(instruction, fields.optional_text("input"), output, chat_template_tokenizer)
    if fmt == "prompt_completion":
        prompt, completion = fields.text("prompt"), fields.text("completion")
        return make_instruction_example(prompt, "", completion, chat_template_tokenizer)
    messages = messages_from_record(fields, fmt)
    return conversation_example(messages, chat_template_tokenizer, record.where)


def system_of(record: Record, fmt: str, columns: Mapping[str, str] | None = None) -> str | None:
    """The system prompt of a chat record (`messages`/`sharegpt`), None when it has none; None for other shapes."""
    if fmt not in ("messages", "sharegpt"):
        return None
    messages = messages_from_record(Fields(record, _NEEDS[fmt], columns or {}), fmt)
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def make_instruction_example(
    instruction: str, input: str, output: str, tokenizer: PreTrainedTokenizerBase | None = None,
    system: str | None = None,
) -> Example:
    """The `Example` for one instruction; the fields are not checked (see `to_example` for that)."""
    prompt = render_prompt(instruction, input, tokenizer, system)
    if has_chat_template(tokenizer):
        return Example.from_prompt(prompt, output + end_of_turn(tokenizer), add_special_tokens=False)
    return Example.from_prompt(prompt, output)


def render_prompt(instruction: str, input: str = "", tokenizer: PreTrainedTokenizerBase | None = None,
                  system: str | None = None) -> str:
    """The prompt text for an instruction, exactly as training renders it; use it at generation time too.

    Chat template (if `tokenizer` has one): the user turn is `instruction`, plus a blank line and `input` when
    `input` is not empty, followed by the template's generation prompt (e.g. `<|im_start|>assistant\\n`); a
    `system` text is the system turn before it (None: the template's own default, if it has one).
    Otherwise the Alpaca template, with the Input section left out when `input` is empty.
    """
    if has_chat_template(tokenizer):
        content = instruction + ("\n\n" + input if input.strip() else "")
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
