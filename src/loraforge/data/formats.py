"""Formats: a `Record` -> an `Example`, the text the model reads (`prompt`) and the text it learns (`response`).

Accepted record shapes (extra keys are ignored):

- `{"text": ...}`: plain language-model text; everything is learned (`prompt=""`).
- `{"instruction": ..., "input": ... (optional), "output": ...}`: instruction tuning; only `output` is learned.
- `{"prompt": ..., "completion": ...}`: treated like an instruction record with `prompt` as the instruction.

Instruction prompts are rendered with the tokenizer's chat template when it has one, else with the Alpaca template.
`render_prompt` is the one place that rendering happens, so generation can rebuild the exact training prompt.
Later issues add chat records and task recipes here, as more names in `FORMATS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge.data.readers import Record, json_type
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

FORMATS = ("text", "instruction", "prompt_completion")

_SHAPES = (
    '{"text": ...}, {"instruction": ..., "input": ... (optional), "output": ...} '
    'or {"prompt": ..., "completion": ...}'
)
_NEEDS = {
    "text": 'text records need a non-empty "text"',
    "instruction": 'instruction records need "instruction" and "output" (optional "input")',
    "prompt_completion": 'prompt/completion records need "prompt" and "completion"',
}
# A marker no real answer contains; we find it in a rendered conversation to see what the template puts after it.
_SENTINEL = "LORAFORGE-RESPONSE-SENTINEL-5f2c"


@dataclass(frozen=True)
class Example:
    """One training example as text: the model reads `prompt + response` and learns only `response`."""

    prompt: str
    """Text the model is conditioned on but not trained to produce ("" for plain text)."""
    response: str
    """Text the model is trained to produce."""
    add_special_tokens: bool = True
    """True for plain text: tokenization adds the tokenizer's BOS (if it adds one by itself) and its EOS (if it has
    one). False when a chat template rendered the text: its special tokens, end-of-turn included, are already in it."""


def detect_format(record: Record) -> str:
    """Name the shape of `record`, one of `FORMATS`.

    A complete shape wins (so the Alpaca dataset, which also carries a rendered "text" column, reads as
    instructions); otherwise a partial one is named so that `to_example` can say which field is missing.
    """
    keys = record.fields.keys()
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
    found = ", ".join(f'"{k}"' for k in keys) or "none"
    raise LoraforgeError(
        f"{record.where}: cannot tell what kind of record this is (fields: {found}); "
        f"use one of these shapes: {_SHAPES}"
    )


def to_example(
    record: Record, fmt: str, *, chat_template_tokenizer: PreTrainedTokenizerBase | None = None
) -> Example:
    """Turn `record` of shape `fmt` into an `Example`, checking its fields.

    With `chat_template_tokenizer` set and its `chat_template` non-empty, instruction-like records are rendered as
    a one-turn chat; otherwise with the Alpaca template. Plain text records ignore the tokenizer.
    """
    if fmt == "text":
        return Example(prompt="", response=_required(record, "text", fmt))
    if fmt == "instruction":
        instruction = _required(record, "instruction", fmt)
        output = _required(record, "output", fmt)
        input_ = _optional(record, "input", fmt)
        return make_instruction_example(instruction, input_, output, chat_template_tokenizer)
    if fmt == "prompt_completion":
        prompt = _required(record, "prompt", fmt)
        completion = _required(record, "completion", fmt)
        return make_instruction_example(prompt, "", completion, chat_template_tokenizer)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def make_instruction_example(
    instruction: str, input: str, output: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> Example:
    """The `Example` for one instruction; the fields are not checked (see `to_example` for that)."""
    prompt = render_prompt(instruction, input, tokenizer)
    if has_chat_template(tokenizer):
        return Example(prompt=prompt, response=output + end_of_turn(tokenizer), add_special_tokens=False)
    return Example(prompt=prompt, response=output)


def render_prompt(instruction: str, input: str = "", tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The prompt text for an instruction, exactly as training renders it; use it at generation time too.

    Chat template (if `tokenizer` has one): the user turn is `instruction`, plus a blank line and `input` when
    `input` is not empty, followed by the template's generation prompt (e.g. `<|im_start|>assistant\\n`).
    Otherwise the Alpaca template, with the Input section left out when `input` is empty.
    """
    if has_chat_template(tokenizer):
        content = instruction + ("\n\n" + input if input.strip() else "")
        messages = [{"role": "user", "content": content}]
        return _render_chat(tokenizer, messages, add_generation_prompt=True)
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """True when `tokenizer` is given and carries a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template writes after an assistant message's content (ChatML: `<|im_end|>`).

    Found by rendering a conversation whose answer is a marker and taking what follows the marker, so it works for
    any template. Trailing whitespace is dropped (generation stops at the end-of-turn token, what follows is never
    produced). A template that writes nothing there falls back to the tokenizer's EOS text.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = _render_chat(tokenizer, messages, add_generation_prompt=False)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise LoraforgeError(
            "the tokenizer's chat template does not write the assistant's message, so it cannot be trained on; "
            "use a tokenizer whose template renders assistant turns, or remove its chat_template to use Alpaca"
        )
    return text[at + len(_SENTINEL):].rstrip() or (tokenizer.eos_token or "")


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # tokenize=False returns text in every transformers 5 release we know
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _required(record: Record, key: str, fmt: str) -> str:
    if key not in record.fields:
        raise LoraforgeError(f'{record.where}: field "{key}" is missing; {_NEEDS[fmt]}')
    value = _string(record, key, fmt)
    if not value.strip():
        raise LoraforgeError(f'{record.where}: field "{key}" is empty; {_NEEDS[fmt]}; fill it in or drop the record')
    return value


def _optional(record: Record, key: str, fmt: str) -> str:
    if record.fields.get(key) is None:
        return ""
    return _string(record, key, fmt)


def _string(record: Record, key: str, fmt: str) -> str:
    value: Any = record.fields[key]
    if not isinstance(value, str):
        raise LoraforgeError(
            f'{record.where}: field "{key}" is a JSON {json_type(value)}, not a string; '
            f"{_NEEDS[fmt]} as strings; put the value in quotes"
        )
    return value
