"""Chat: conversations rendered with the tokenizer's chat template, learning only the assistant turns.

Two record shapes:

- `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "system": ... (optional)}`
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system": ... (optional)}`

How the assistant spans are found, for any template: render the whole conversation once, then for each assistant
turn i render the messages before it with the generation prompt (`<|im_start|>assistant\\n`) and the messages up to
and including it. Both must be prefixes of the whole render, or the template is not prefix-stable (it renders an
early turn differently depending on what follows) and we stop with an error rather than guess. Between the two
prefixes lies the turn: its content and end-of-turn marker (`<|im_end|>`) are learned; whitespace after the marker
and everything else (system, user turns, role headers) is not. The segments are slices of the one full render, so
they concatenate to it exactly (trailing whitespace at the very end is dropped, as for instruction records).

A template that writes nothing after an assistant's content gets the tokenizer's EOS text there instead, so the
model still learns to stop (the same fallback as `end_of_turn`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.data.example import Example, Fields, Segment
from loraforge.data.readers import json_type
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
"""ShareGPT's `from` -> our role."""
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Plain ChatML, for a tokenizer without a template: `tokenizer.chat_template = CHATML_TEMPLATE`. Its markers are
ordinary text to a tokenizer that lacks `<|im_start|>`/`<|im_end|>` as tokens; add them as special tokens first."""
# A marker no real answer contains; we find it in a rendered conversation to see what the template puts after it.
_SENTINEL = "LORAFORGE-RESPONSE-SENTINEL-5f2c"


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
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise LoraforgeError(
            "the tokenizer's chat template does not write the assistant's message, so it cannot be trained on; "
            "use a tokenizer whose template renders assistant turns, or remove its chat_template to use Alpaca"
        )
    return text[at + len(_SENTINEL):].rstrip() or (tokenizer.eos_token or "")


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    """`apply_chat_template` as text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # tokenize=False returns text in every transformers 5 release we know
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str = "messages"
                    ) -> list[int]:
    """The ids of a conversation so far followed by the template's generation prompt: what a model continues to
    write the next assistant turn (one user turn gives the ids `encode_prompt` gives, as training rendered them)."""
    require_chat_template(tokenizer, where)
    return list(tokenizer(_render(tokenizer, messages, True, where), add_special_tokens=False)["input_ids"])


def messages_from_record(fields: Fields, fmt: str) -> list[dict[str, str]]:
    """The conversation of a `messages` or `sharegpt` record as `[{"role", "content"}]`, checked.

    A top-level `system` string becomes the first message unless the conversation already starts with one.
    At least one assistant message is needed, and no assistant message may be blank.
    """
    if fmt == "messages":
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    else:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    messages = []
    for n, item in enumerate(fields.array(key)):
        if not isinstance(item, dict):
            shape = f'each item must be {{"{role_key}": ..., "{text_key}": ...}}'
            raise fields.error(key, f"item {n} is a JSON {json_type(item)}", shape)
        role, text = item.get(role_key), item.get(text_key)
        if role not in roles:
            raise fields.error(key, f'item {n} has "{role_key}": {role!r}', f"use one of: {', '.join(roles)}")
        if not isinstance(text, str):
            raise fields.error(key, f'item {n} has no string "{text_key}" (found a JSON {json_type(text)})')
        if roles[role] == "assistant" and not text.strip():
            problem = f'item {n} is an assistant turn with an empty "{text_key}"'
            raise fields.error(key, problem, "fill it in or drop it")
        messages.append({"role": roles[role], "content": text})
    system = fields.optional_text("system")
    if system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise fields.error(key, "has no assistant turn, so nothing would be learned", "add one or drop the record")
    return messages


def conversation_example(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str) -> Example:
    """The `Example` of a conversation: every assistant turn's content and end-of-turn learned, the rest not."""
    require_chat_template(tokenizer, where)
    full = _render(tokenizer, messages, False, where)
    segments: list[Segment] = []
    done = 0  # characters of `full` already in `segments`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _prefix(tokenizer, messages[:i], True, full, where, i)
        turn = _prefix(tokenizer, messages[: i + 1], False, full, where, i + 1)
        if len(head) < done or len(turn) < len(head):
            raise _not_prefix_stable(where, i)
        span = full[len(head):len(turn)]
        content = message["content"].strip()
        start = span.find(content)
        if start < 0:
            raise LoraforgeError(
                f"{where}: the chat template changes the text of message {i} (assistant) when rendering it, so "
                "the tokens to learn cannot be found; use a template that writes assistant content as given"
            )
        end = max(len(span.rstrip()), start + len(content))
        learned = span[start:end]
        if end == start + len(content):  # the template wrote no end-of-turn marker
            learned += tokenizer.eos_token or ""
        segments += [Segment(full[done:len(head) + start], False), Segment(learned, True)]
        done = len(head) + end
    if full[done:].strip():
        segments.append(Segment(full[done:], False))  # turns after the last answer: read, not learned
    return Example(tuple(segments), add_special_tokens=False)


def require_chat_template(tokenizer: PreTrainedTokenizerBase | None, where: str) -> None:
    if not has_chat_template(tokenizer):
        raise LoraforgeError(
            f"{where}: chat records need a tokenizer with a chat template, and this one has none; use an "
            "instruct model, set one (e.g. `tokenizer.chat_template = loraforge.data.chat.CHATML_TEMPLATE`), "
            'or convert the data to instruction records ({"instruction": ..., "output": ...})'
        )


def _prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool, full: str, where: str, n: int
) -> str:
    text = _render(tokenizer, messages, gen, where)
    if not full.startswith(text):
        raise _not_prefix_stable(where, n)
    return text


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool, where: str) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=gen)
    except TypeError:
        raise
    except Exception as e:  # jinja2 errors, incl. the template's own raise_exception("roles must alternate ...")
        raise LoraforgeError(f"{where}: the chat template cannot render this conversation: {e}") from None


def _not_prefix_stable(where: str, n: int) -> LoraforgeError:
    return LoraforgeError(
        f"{where}: the tokenizer's chat template is not prefix-stable: the first {n} messages render differently "
        "on their own than at the start of the whole conversation, so the assistant turns cannot be located; use "
        "a template that renders earlier turns the same whatever follows (ChatML does), or one turn per record"
    )


SYSTEM_PROMPT_FILE = "chat_defaults.json"
"""Beside an adapter: {"system": "..."}, the one system prompt its training chats had; generation uses it by default."""


def read_system_prompt(folder: str | Path) -> str | None:
    """The system prompt kept beside an adapter, or None."""
    path = Path(folder) / SYSTEM_PROMPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraforgeError(f"{path}: not valid JSON ({err}); delete it or write {{\"system\": \"...\"}}") from None
    system = data.get("system") if isinstance(data, dict) else None
    if system is not None and not isinstance(system, str):
        raise LoraforgeError(f"{path}: field 'system' must be a string")
    return system


def write_system_prompt(folder: str | Path, system: str) -> Path:
    """Keep the one system prompt of an adapter's training chats beside it."""
    path = Path(folder) / SYSTEM_PROMPT_FILE
    path.write_text(json.dumps({"system": system}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
