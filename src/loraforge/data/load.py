"""The whole data path in one call: file -> records -> examples (by format or task recipe) -> tokenized examples,
with counts of what happened to every record."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraforge.data.example import check_columns
from loraforge.data.formats import CHUNKED_FORMATS, FORMAT_FIELDS, FORMATS, detect_format, system_of, to_example
from loraforge.data.readers import Record, read_records
from loraforge.data.recipes import Recipe, get_recipe
from loraforge.data.split import sample_few_shot
from loraforge.data.tokenize import (
    TokenizedExample,
    check_max_length,
    chunk_documents,
    document_ids,
    tokenize_example,
)
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ON_BAD_RECORD = ("error", "skip")
MAX_SKIP_REASONS = 20
_PROMPT = {
    "instruction": 'the prompt (from fields "instruction" and "input")',
    "prompt_completion": 'the prompt (from field "prompt")',
    "text": "the BOS token",
    "messages": "the conversation before the first assistant turn",
    "sharegpt": "the conversation before the first assistant turn",
}
_ALL_FORMAT_FIELDS = tuple(dict.fromkeys(f for names in FORMAT_FIELDS.values() for f in names))


@dataclass
class DataStats:
    """What happened to the records of one file."""

    records_read: int = 0
    """Records the reader produced (blank lines are not records)."""
    used: int = 0
    """Records that became training examples (with chunking: records whose tokens are in the chunks)."""
    skipped: int = 0
    """Records left out (only with `on_bad_record="skip"`); the first reasons are in `skip_reasons`."""
    truncated: int = 0
    """Used examples cut to `max_length` tokens."""
    tokens: int = 0
    """Tokens in the used examples, after truncation."""
    target_tokens: int = 0
    """Of those, tokens that are learned (label is not -100)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Used records per record shape or recipe, e.g. {"instruction": 300} or {"recipe:sst2": 300}."""
    chunks: int = 0
    """Examples made by chunking the file's token stream (`text_chunks` format, `lm` recipe); 0 otherwise."""
    skip_reasons: list[str] = field(default_factory=list)
    """The error message of each skipped record, the first `MAX_SKIP_REASONS` of them."""
    systems: set[str | None] = field(default_factory=set)
    """The system prompts of the used chat records (None: a chat without one); empty when no record was a chat."""

    @property
    def one_system(self) -> str | None:
        """The system prompt every chat record had, when they all had the same one; else None."""
        return next(iter(self.systems)) if len(self.systems) == 1 else None

    def skip(self, err: LoraforgeError, on_bad_record: str) -> None:
        """A bad record: re-raise with `on_bad_record="error"`, else count it and keep the first reasons."""
        if on_bad_record == "error":
            raise err
        self.skipped += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(str(err))

    def use(self, truncated: bool, tokens: int, target_tokens: int) -> None:
        """Count one record that became an example."""
        self.used += 1
        self.truncated += truncated
        self.tokens += tokens
        self.target_tokens += target_tokens

    def summary(self) -> str:
        """One line for the console, e.g. `300 records: 298 used, 2 skipped, 5 truncated; 21,400 tokens ...`."""
        chunks = f" in {self.chunks:,} chunks" if self.chunks else ""
        return (
            f"{self.records_read} records: {self.used} used, {self.skipped} skipped, {self.truncated} truncated; "
            f"{self.tokens:,} tokens{chunks}, {self.target_tokens:,} of them learned"
        )


def load_examples(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    on_bad_record: str = "error",
    recipe: str | Recipe | None = None,
    columns: Mapping[str, str] | None = None,
    fmt: str | None = None,
    file_format: str | None = None,
    reader_options: Mapping[str, Any] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> tuple[list[TokenizedExample], DataStats]:
    """Read a data file and return its tokenized examples, in file order, and counts of what happened.

    How records become examples, one of:
    - `recipe` (a name in `RECIPES` or a `Recipe`): a task recipe, e.g. "sst2", "conll2003", "e2e";
    - `fmt` (one of `FORMATS`): a record shape, e.g. "messages" or "text_chunks" (never detected);
    - neither: the shape of each record is detected (`detect_format`).
    `columns` maps the field names the format or recipe reads to the file's own, e.g.
    `{"instruction": "en_instruction", "input": "en_input", "output": "en_output"}`.
    `file_format` and `reader_options` go to `read_records` (`file_format="conll"` for CoNLL-2003's `eng.train`,
    which has no suffix; `reader_options={"delimiter": ";"}`); by default the suffix picks the reader.
    `max_examples` keeps a seeded sample of that many records (few-shot), drawn as the file streams by;
    stratified by label for classification recipes (`split.sample_few_shot`).

    One example per record, cut to `max_length`, except for `text_chunks` and the `lm` recipe: those join the
    documents with EOS and cut the stream into `max_length` chunks (`tokenize.chunk_documents`).
    Instruction-like records and recipes use the tokenizer's chat template if it has one, else Alpaca.
    `on_bad_record="error"` (default) stops at the first record whose fields are wrong or that has nothing left
    to learn after truncation to `max_length`; `"skip"` leaves such records out and counts them. A broken file
    (bad JSON, bad bytes, no records) always stops, and so does a file where no record is usable.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise LoraforgeError(f"on_bad_record is {on_bad_record!r}; choose one of: {', '.join(ON_BAD_RECORD)}")
    check_max_length(max_length)
    chosen = _choose(recipe, fmt, columns)
    records = read_records(path, file_format, **dict(reader_options or {}))
    return _examples(path, records, chosen, tokenizer, max_length, on_bad_record, max_examples, seed)


def load_examples_by(path: str | os.PathLike[str], group_field: str, tokenizer: PreTrainedTokenizerBase,
                     max_length: int, *, on_bad_record: str = "error", recipe: str | Recipe | None = None,
                     columns: Mapping[str, str] | None = None, fmt: str | None = None,
                     file_format: str | None = None, max_examples: int | None = None, seed: int = 0
                     ) -> dict[str, tuple[list[TokenizedExample], DataStats]]:
    """`load_examples` split by the value of `group_field` (e.g. a user id), in order of first appearance: one read
    of the file, each record tokenized once. `max_examples` samples that many records per group."""
    if on_bad_record not in ON_BAD_RECORD:
        raise LoraforgeError(f"on_bad_record is {on_bad_record!r}; choose one of: {', '.join(ON_BAD_RECORD)}")
    check_max_length(max_length)
    chosen = _choose(recipe, fmt, columns)
    groups: dict[str, list[Record]] = {}
    for record in read_records(path, file_format):
        value = record.fields.get(group_field)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise LoraforgeError(f"{record.where}: field \"{group_field}\" is {value!r}; every record needs a "
                                 f"non-empty string \"{group_field}\" naming whose adapter it trains")
        groups.setdefault(str(value), []).append(record)
    if not groups:
        raise LoraforgeError(f"{path}: no records")
    return {key: _examples(f"{path} ({group_field}={key})", iter(records), chosen, tokenizer, max_length,
                           on_bad_record, max_examples, seed) for key, records in groups.items()}


def _examples(where, records: Iterator[Record], chosen: _Choice, tokenizer, max_length: int, on_bad_record: str,
              max_examples: int | None, seed: int) -> tuple[list[TokenizedExample], DataStats]:
    stats = DataStats()
    if max_examples:
        label = chosen.recipe.columns.get("label", "label") if chosen.recipe and "label" in chosen.recipe.FIELDS \
            else None
        records = iter(sample_few_shot(records, max_examples, seed, label_key=label))
    tokenized = _tokenize_records(records, chosen, tokenizer, max_length, on_bad_record, stats)
    if chosen.chunked:
        examples = list(chunk_documents(tokenized, max_length))
        stats.chunks = len(examples)
        stats.tokens = sum(len(e.input_ids) for e in examples)
        stats.target_tokens = sum(e.num_target_tokens for e in examples)
    else:
        examples = list(tokenized)
    if not examples:
        first = stats.skip_reasons[0] if stats.skip_reasons else "its text is too short to make a chunk of 2 tokens"
        raise LoraforgeError(
            f"{where}: none of its {stats.records_read} records can be used; the first problem was: {first}"
        )
    return examples, stats


@dataclass(frozen=True)
class _Choice:
    """How records become examples: by recipe, by a fixed format, or by detecting each record's format."""

    recipe: Recipe | None
    fmt: str | None
    columns: dict[str, str]

    @property
    def chunked(self) -> bool:
        return self.recipe.chunked if self.recipe is not None else self.fmt in CHUNKED_FORMATS


def _choose(recipe: str | Recipe | None, fmt: str | None, columns: Mapping[str, str] | None) -> _Choice:
    if recipe is not None and fmt is not None:
        raise LoraforgeError(f"give a recipe ({recipe!r}) or a format ({fmt!r}), not both: a recipe fixes the format")
    if recipe is not None:
        return _Choice(get_recipe(recipe).with_columns(columns), None, {})
    if fmt is not None and fmt not in FORMATS:
        raise LoraforgeError(f'unknown format "{fmt}"; choose one of: {", ".join(FORMATS)}, or give a recipe')
    known = FORMAT_FIELDS[fmt] if fmt else _ALL_FORMAT_FIELDS
    return _Choice(None, fmt, check_columns(columns, known, f'the "{fmt}" format' if fmt else "any format"))


def _tokenize_records(
    records: Iterator[Record],
    chosen: _Choice,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_bad_record: str,
    stats: DataStats,
) -> Iterator[TokenizedExample]:
    """Tokenize each record (uncut when the result will be chunked), counting into `stats` as it goes."""
    for record in records:
        stats.records_read += 1
        try:
            kind, tokenized = _tokenize_record(record, chosen, tokenizer, max_length)
        except LoraforgeError as e:
            stats.skip(e, on_bad_record)
            continue
        stats.use(tokenized.truncated, len(tokenized.input_ids), tokenized.num_target_tokens)
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        if kind in ("messages", "sharegpt"):
            stats.systems.add(system_of(record, kind, chosen.columns))
        yield tokenized


def _tokenize_record(
    record: Record, chosen: _Choice, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[str, TokenizedExample]:
    if chosen.recipe is not None:
        kind, prompt = f"recipe:{chosen.recipe.name}", f"the {chosen.recipe.name} recipe's prompt"
        example = chosen.recipe.to_example(record, tokenizer)
    else:
        kind = chosen.fmt or detect_format(record, chosen.columns)
        prompt = _PROMPT.get(kind, "the prompt")
        example = to_example(record, kind, chat_template_tokenizer=tokenizer, columns=chosen.columns)
    if chosen.chunked:
        return kind, document_ids(example.text, tokenizer)
    tokenized = tokenize_example(example, tokenizer, max_length)
    if tokenized.num_target_tokens == 0:
        raise LoraforgeError(
            f"{record.where}: nothing left to learn: {prompt} fills all "
            f"{max_length} tokens of max_length; raise max_length, shorten the record, or skip such records "
            '(on_bad_record="skip")'
        )
    return kind, tokenized
