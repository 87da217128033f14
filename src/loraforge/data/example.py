"""`Example`, the text of one training example cut into learned and unlearned segments, and `Fields`, the checked
view of a record that formats and recipes read their fields through.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from loraforge.data.readers import Record, json_type
from loraforge.errors import LoraforgeError


class Segment(NamedTuple):
    """A piece of an example's text, tokenized on its own; `learned` says whether its tokens get labels."""

    text: str
    learned: bool


@dataclass(frozen=True)
class Example:
    """One training example as text: the model reads all segments in order and learns only the `learned` ones.

    A prompt/response pair is two segments (`Example.from_prompt`); a multi-turn chat alternates unlearned template
    and user text with learned assistant turns. Empty segments are dropped, so equal texts give equal examples.
    """

    segments: tuple[Segment, ...]
    """The text, in order; each segment is tokenized separately and the ids are concatenated."""
    add_special_tokens: bool = True
    """True for plain text: tokenization adds the tokenizer's BOS (if it adds one by itself) and its EOS (if it has
    one). False when a chat template rendered the text: its special tokens, end-of-turn included, are already in it."""

    def __post_init__(self) -> None:
        segments = tuple(Segment(text, bool(learned)) for text, learned in self.segments)
        if any(not isinstance(s.text, str) for s in segments):
            raise TypeError("Example segments must be (str, bool) pairs")
        object.__setattr__(self, "segments", tuple(s for s in segments if s.text))

    @classmethod
    def from_prompt(cls, prompt: str, response: str, *, add_special_tokens: bool = True) -> Example:
        """The two-segment example: `prompt` is read, `response` is learned ("" prompt for plain text)."""
        return cls(((prompt, False), (response, True)), add_special_tokens=add_special_tokens)

    @property
    def prompt(self) -> str:
        """The text before the first learned segment: what generation is fed to produce the first answer."""
        texts = []
        for segment in self.segments:
            if segment.learned:
                break
            texts.append(segment.text)
        return "".join(texts)

    @property
    def response(self) -> str:
        """The text from the first learned segment to the end."""
        return self.text[len(self.prompt):]

    @property
    def text(self) -> str:
        """All segments joined."""
        return "".join(s.text for s in self.segments)

    @property
    def learned_text(self) -> list[str]:
        """The learned segments' texts, in order."""
        return [s.text for s in self.segments if s.learned]


@dataclass(frozen=True)
class Fields:
    """A record's fields under the names a format or recipe uses, read with checks whose errors point at the record.

    `columns` maps our name to the record's own (`{"output": "en_output"}`); names not in it are read as they are.
    Every error starts with `file:line`, names the record's field (and ours, when mapped) and ends with `needs`.
    """

    record: Record
    needs: str
    """What the format or recipe needs, for error messages, e.g. 'text records need a non-empty "text"'."""
    columns: Mapping[str, str] = field(default_factory=dict)

    def name(self, key: str) -> str:
        """The record's name for our field `key`."""
        return self.columns.get(key, key)

    def label(self, key: str) -> str:
        """`"en_output" (as "output")` when mapped, else `"output"`: how error messages name a field."""
        source = self.name(key)
        return f'"{source}"' if source == key else f'"{source}" (as "{key}")'

    def has(self, key: str) -> bool:
        return self.record.fields.get(self.name(key)) is not None

    def error(self, key: str, problem: str, fix: str = "") -> LoraforgeError:
        """`file:line: field "x" <problem>; <needs>[; <fix>]`."""
        tail = f"; {fix}" if fix else ""
        return LoraforgeError(f"{self.record.where}: field {self.label(key)} {problem}; {self.needs}{tail}")

    def value(self, key: str) -> Any:
        """The raw value; a missing field is an error."""
        if self.name(key) not in self.record.fields:
            have = ", ".join(f'"{k}"' for k in self.record.fields) or "none"
            fix = f"the record has {have}" + ("; rename with --columns ours=theirs" if self.record.fields else "")
            raise self.error(key, "is missing", fix)
        return self.record.fields[self.name(key)]

    def text(self, key: str) -> str:
        """A required, non-blank string."""
        value = self.value(key)
        self._check_string(key, value)
        if not value.strip():
            raise self.error(key, "is empty", "fill it in or drop the record")
        return value

    def optional_text(self, key: str) -> str:
        """A string that may be absent or null (read as "")."""
        value = self.record.fields.get(self.name(key))
        if value is None:
            return ""
        self._check_string(key, value)
        return value

    def texts(self, key: str) -> list[str]:
        """A non-empty string, or a non-empty list of strings, as a list (blank items are dropped)."""
        value = self.value(key)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise self.error(key, f"is a JSON {json_type(value)}", "it must be a string or an array of strings")
        items = [v for v in items if v.strip()]
        if not items:
            raise self.error(key, "is empty", "fill it in or drop the record")
        return items

    def array(self, key: str) -> list[Any]:
        """A non-empty JSON array."""
        value = self.value(key)
        if not isinstance(value, list):
            raise self.error(key, f"is a JSON {json_type(value)}, not an array")
        if not value:
            raise self.error(key, "is an empty array", "fill it in or drop the record")
        return value

    def _check_string(self, key: str, value: Any) -> None:
        if not isinstance(value, str):
            raise self.error(key, f"is a JSON {json_type(value)}, not a string", "put the value in quotes")


def check_columns(columns: Mapping[str, str] | None, known: tuple[str, ...], what: str) -> dict[str, str]:
    """Validate a column mapping (our name -> the record's name) against the names `what` reads."""
    columns = dict(columns or {})
    for ours, theirs in columns.items():
        if ours not in known:
            raise LoraforgeError(
                f'columns: {what} has no field "{ours}"; map one of: {", ".join(known)} '
                f'(e.g. columns={{"{known[0]}": "my_column"}})'
            )
        if not isinstance(theirs, str) or not theirs:
            raise LoraforgeError(f'columns: "{ours}" must map to a column name (a non-empty string), not {theirs!r}')
    return columns
