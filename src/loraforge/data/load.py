"""The whole data path in one call: file -> records -> examples -> tokenized examples, with counts."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraforge.data.formats import detect_format, to_example
from loraforge.data.readers import Record, read_records
from loraforge.data.tokenize import TokenizedExample, check_max_length, tokenize_example
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ON_BAD_RECORD = ("error", "skip")
MAX_SKIP_REASONS = 20
_PROMPT_FIELDS = {"instruction": '"instruction" and "input"', "prompt_completion": '"prompt"', "text": "none"}


@dataclass
class DataStats:
    """What happened to the records of one file."""

    records_read: int = 0
    """Records the reader produced (blank lines are not records)."""
    used: int = 0
    """Records that became training examples."""
    skipped: int = 0
    """Records left out (only with `on_bad_record="skip"`); the first reasons are in `skip_reasons`."""
    truncated: int = 0
    """Used examples cut to `max_length` tokens."""
    tokens: int = 0
    """Tokens in the used examples, after truncation."""
    target_tokens: int = 0
    """Of those, tokens that are learned (label is not -100)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Used examples per record shape, e.g. {"instruction": 300}."""
    skip_reasons: list[str] = field(default_factory=list)
    """The error message of each skipped record, the first `MAX_SKIP_REASONS` of them."""

    def summary(self) -> str:
        """One line for the console, e.g. `300 records: 298 used, 2 skipped, 5 truncated; 21,400 tokens ...`."""
        return (
            f"{self.records_read} records: {self.used} used, {self.skipped} skipped, {self.truncated} truncated; "
            f"{self.tokens:,} tokens, {self.target_tokens:,} of them learned"
        )


def load_examples(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    on_bad_record: str = "error",
) -> tuple[list[TokenizedExample], DataStats]:
    """Read a data file and return its tokenized examples, in file order, and counts of what happened.

    Instruction-like records use the tokenizer's chat template if it has one, else Alpaca (`render_prompt`).
    `on_bad_record="error"` (default) stops at the first record whose fields are wrong or that has nothing left
    to learn after truncation to `max_length`; `"skip"` leaves such records out and counts them. A broken file
    (bad JSON, bad bytes, no records) always stops, and so does a file where no record is usable.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise LoraforgeError(f"on_bad_record is {on_bad_record!r}; choose one of: {', '.join(ON_BAD_RECORD)}")
    check_max_length(max_length)
    stats = DataStats()
    examples: list[TokenizedExample] = []
    for record in read_records(path):
        stats.records_read += 1
        try:
            fmt, tokenized = _tokenize_record(record, tokenizer, max_length)
        except LoraforgeError as e:
            if on_bad_record == "error":
                raise
            stats.skipped += 1
            if len(stats.skip_reasons) < MAX_SKIP_REASONS:
                stats.skip_reasons.append(str(e))
            continue
        examples.append(tokenized)
        stats.used += 1
        stats.truncated += tokenized.truncated
        stats.tokens += len(tokenized.input_ids)
        stats.target_tokens += tokenized.num_target_tokens
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
    if not examples:
        raise LoraforgeError(
            f"{path}: none of its {stats.records_read} records can be used; the first problem was: "
            f"{stats.skip_reasons[0]}"
        )
    return examples, stats


def _tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[str, TokenizedExample]:
    fmt = detect_format(record)
    example = to_example(record, fmt, chat_template_tokenizer=tokenizer)
    tokenized = tokenize_example(example, tokenizer, max_length)
    if tokenized.num_target_tokens == 0:
        raise LoraforgeError(
            f"{record.where}: nothing left to learn: the prompt (from fields {_PROMPT_FIELDS[fmt]}) fills all "
            f"{max_length} tokens of max_length; raise max_length, shorten the record, or skip such records "
            '(on_bad_record="skip")'
        )
    return fmt, tokenized
