"""The data path: file --reader--> Record --format--> Example --tokenize--> TokenizedExample --collate--> batch.

Each arrow is one small function in its own module; `load_examples` chains the first three for a whole file.
"""
from __future__ import annotations

from loraforge.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMATS,
    Example,
    detect_format,
    end_of_turn,
    has_chat_template,
    make_instruction_example,
    render_prompt,
    to_example,
)
from loraforge.data.load import ON_BAD_RECORD, DataStats, load_examples
from loraforge.data.readers import READERS, Record, read_jsonl, read_records
from loraforge.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    count_tokens,
    encode_prompt,
    pad_id_for,
    tokenize_example,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "ON_BAD_RECORD",
    "READERS",
    "DataStats",
    "Example",
    "Record",
    "TokenizedExample",
    "collate",
    "count_tokens",
    "detect_format",
    "encode_prompt",
    "end_of_turn",
    "has_chat_template",
    "load_examples",
    "make_instruction_example",
    "pad_id_for",
    "read_jsonl",
    "read_records",
    "render_prompt",
    "tokenize_example",
    "to_example",
]
