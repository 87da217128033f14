"""Tokenize: an `Example` -> token ids and labels (-100 on what is not learned) -> a padded batch of tensors.

Each segment of an example is tokenized on its own and the ids are concatenated, so a prompt's ids are exactly the
ids `encode_prompt` gives at generation time (tokenizing the joined text could merge tokens across a seam).
Labels are the ids on learned segments and `IGNORE_INDEX` elsewhere.

Special tokens, kept simple:
- Text is always tokenized with `add_special_tokens=False`; we add what is needed ourselves, once.
- Chat-template text (`Example.add_special_tokens=False`) gets nothing added: the template already wrote its BOS
  (if any) and the end-of-turn marker. This matches `apply_chat_template(..., tokenize=True)`.
- Plain text (Alpaca prompts, text records) gets a BOS in front (not learned) if the tokenizer puts one there by
  itself (`tokenizer("a")` starts with `bos_token_id`, e.g. Llama; GPT-2-style tokenizers do not) and it is not
  already there, and the tokenizer's EOS at the end if it has an `eos_token_id` (learned when the last segment
  is, so the model learns to stop). BERT-style tokenizers (no BOS/EOS) get neither; [CLS]/[SEP] are never added.

Two ways to fit `max_length`:
- one example per record (`tokenize_example`): tokens past `max_length` are cut off the end, and counted;
- a token stream (`chunk_documents`, for the `text_chunks` format): documents, each tokenized like a text record
  (BOS?, text, EOS), are concatenated and cut into consecutive `max_length` chunks; nothing is dropped but a
  final chunk too short to predict anything.

Labels are aligned with `input_ids` (not shifted): transformers' causal-LM loss shifts them itself.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraforge.data.example import Example
from loraforge.data.formats import make_instruction_example
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a token that is not learned (prompt, BOS, padding); the value torch's cross-entropy skips."""


@dataclass(frozen=True)
class TokenizedExample:
    """One example as ids: `labels[i]` is `input_ids[i]` where it is learned, else `IGNORE_INDEX`."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    """True if tokens were cut off the end to fit `max_length`."""

    @property
    def num_target_tokens(self) -> int:
        """How many tokens are learned; 0 means the example teaches nothing."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenizedExample:
    """Tokenize `example` segment by segment, mask what is not learned with `IGNORE_INDEX`, cut to `max_length`.

    Truncation drops tokens from the end (the EOS too: the text did not end there). The caller decides what to do
    with an example left with no learned tokens (`num_target_tokens == 0`); see `load_examples`.
    """
    check_max_length(max_length)
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in example.segments:
        ids = _encode(tokenizer, segment.text)
        input_ids += ids
        labels += ids if segment.learned else [IGNORE_INDEX] * len(ids)
    if example.add_special_tokens:
        if _needs_bos(tokenizer, input_ids):
            input_ids.insert(0, tokenizer.bos_token_id)
            labels.insert(0, IGNORE_INDEX)
        if tokenizer.eos_token_id is not None:
            last_learned = bool(example.segments) and example.segments[-1].learned
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id if last_learned else IGNORE_INDEX)
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated=len(input_ids) > max_length)


def prompt_ids(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids `tokenize_example` puts before the first learned token: feed them to generate for the first answer."""
    ids: list[int] = []
    for segment in example.segments:
        if segment.learned:
            break
        ids += _encode(tokenizer, segment.text)
    if example.add_special_tokens and _needs_bos(tokenizer, ids or _first_ids(example, tokenizer)):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def encode_prompt(instruction: str, input: str, tokenizer: PreTrainedTokenizerBase, system: str | None = None
                  ) -> list[int]:
    """The ids of an instruction's prompt, exactly as training put them before the response; feed them to generate.

    Uses the chat template if `tokenizer` has one (with `system` as its system turn when given), else the Alpaca
    template (see `formats.render_prompt`).
    """
    return prompt_ids(make_instruction_example(instruction, input, "", tokenizer, system), tokenizer)


def document_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> TokenizedExample:
    """One document for the token stream, uncut: like a text record (BOS? not learned, text, EOS learned)."""
    return tokenize_example(Example.from_prompt("", text), tokenizer, sys.maxsize)


def chunk_documents(documents: Iterable[TokenizedExample], max_length: int) -> Iterator[TokenizedExample]:
    """Concatenate `documents` (see `document_ids`) into one stream and cut it into chunks of `max_length` tokens.

    Documents are kept apart by the EOS each one ends with, not by attention: a chunk may hold the end of one
    document and the start of the next, as in GPT-2-style pretraining. Chunks come out in order as soon as they
    are full; the last one is shorter, and is dropped only if it has fewer than 2 tokens (a 1-token chunk
    predicts nothing, the loss shifts labels by one). No chunk is marked truncated: no token is lost.
    """
    check_max_length(max_length)
    ids: list[int] = []
    labels: list[int] = []
    for document in documents:
        ids += document.input_ids
        labels += document.labels
        while len(ids) >= max_length:
            yield TokenizedExample(ids[:max_length], labels[:max_length])
            del ids[:max_length], labels[:max_length]
    if len(ids) >= 2:
        yield TokenizedExample(ids, labels)


def check_max_length(max_length: int) -> None:
    """Raise `LoraforgeError` unless `max_length` is a positive int."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise LoraforgeError(
            f"max_length is {max_length!r}; it must be a whole number of tokens, at least 1 (e.g. 512)"
        )


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `batch` into tensors of shape (B, T), T the longest example.

    Returns `input_ids` (padding = `pad_id`), `attention_mask` (1 on tokens, 0 on padding) and `labels`
    (`IGNORE_INDEX` on padding), all int64.
    """
    if not batch:
        raise ValueError("collate() needs at least one example")
    B, T = len(batch), max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of real (non-padding) tokens in a collated batch."""
    return int(batch["attention_mask"].sum().item())


def pad_id_for(tokenizer: PreTrainedTokenizerBase) -> int:
    """A padding id for `collate`: the pad token, else EOS, else 0 (padding is masked out, so any id works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_ids(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    for segment in example.segments:
        ids = _encode(tokenizer, segment.text)
        if ids:
            return ids[:1]
    return []


def _needs_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> bool:
    """A plain-text example starts with BOS if the tokenizer adds one by itself and it is not there yet."""
    return _adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does the tokenizer put its BOS in front by itself? Probed, since tokenizers say so in different ways."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos
