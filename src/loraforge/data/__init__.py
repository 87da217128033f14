"""The data path: file --reader--> Record --format or recipe--> Example --tokenize--> TokenizedExample --collate-->
batch.

Each arrow is one small function in its own module; `load_examples` chains the first three for a whole file.
`Example` holds text segments, each learned or not (a prompt/response pair, or a chat with several assistant
turns); task recipes (`recipes.py`) also know their metric and how to read a generated answer back.
"""
from __future__ import annotations

from loraforge.data.chat import CHATML_TEMPLATE, conversation_example
from loraforge.data.example import Example, Fields, Segment
from loraforge.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMAT_FIELDS,
    FORMATS,
    detect_format,
    end_of_turn,
    has_chat_template,
    make_instruction_example,
    render_prompt,
    to_example,
)
from loraforge.data.load import ON_BAD_RECORD, DataStats, load_examples, load_examples_by
from loraforge.data.mix import MixStats, draw_mix, load_mix, mix_probabilities
from loraforge.data.ner import iob1_to_bio
from loraforge.data.readers import READERS, Record, read_jsonl, read_records
from loraforge.data.recipes import METRICS, RECIPES, Recipe, get_recipe, make_recipe
from loraforge.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    chunk_documents,
    collate,
    count_tokens,
    document_ids,
    encode_prompt,
    pad_id_for,
    prompt_ids,
    tokenize_example,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHATML_TEMPLATE",
    "FORMATS",
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "METRICS",
    "ON_BAD_RECORD",
    "READERS",
    "RECIPES",
    "DataStats",
    "Example",
    "Fields",
    "MixStats",
    "Recipe",
    "Record",
    "Segment",
    "TokenizedExample",
    "chunk_documents",
    "collate",
    "conversation_example",
    "count_tokens",
    "detect_format",
    "document_ids",
    "draw_mix",
    "encode_prompt",
    "end_of_turn",
    "get_recipe",
    "make_recipe",
    "has_chat_template",
    "iob1_to_bio",
    "load_examples",
    "load_examples_by",
    "load_mix",
    "make_instruction_example",
    "mix_probabilities",
    "pad_id_for",
    "prompt_ids",
    "read_jsonl",
    "read_records",
    "render_prompt",
    "tokenize_example",
    "to_example",
]
