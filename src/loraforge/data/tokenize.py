"""Tokenize: an `Example` -> token ids and labels (-100 on what is not learned) -> a padded batch of tensors.

Prompt and response are tokenized separately and concatenated, so the prompt's ids are exactly the ids
`encode_prompt` gives at generation time (tokenizing the joined text could merge tokens across the seam).

Special tokens, kept simple:
- Text is always tokenized with `add_special_tokens=False`; we add what is needed ourselves, once.
- Chat-template text (`Example.add_special_tokens=False`) gets nothing added: the template already wrote its BOS
  (if any) and the end-of-turn marker. This matches `apply_chat_template(..., tokenize=True)`.
- Plain text (Alpaca prompts, text records) gets a BOS in front if the tokenizer puts one there by itself
  (`tokenizer("a")` starts with `bos_token_id`, e.g. Llama; GPT-2-style tokenizers do not) and it is not already
  there, and the tokenizer's EOS after the response if it has an `eos_token_id` (so the model learns to stop).
  BERT-style tokenizers (no BOS/EOS) get neither; their [CLS]/[SEP] are never added.

Labels are aligned with `input_ids` (not shifted): transformers' causal-LM loss shifts them itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loraforge.data.formats import Example, make_instruction_example
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
    """Tokenize `example`, mask its prompt with `IGNORE_INDEX` and cut the result to `max_length` tokens.

    Truncation drops tokens from the end (the EOS too: the text did not end there). The caller decides what to do
    with an example left with no learned tokens (`num_target_tokens == 0`); see `load_examples`.
    """
    check_max_length(max_length)
    response_ids = _encode(tokenizer, example.response)
    prompt_ids = _encode_prompt(example, tokenizer, response_ids)
    if example.add_special_tokens and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated=len(input_ids) > max_length)


def encode_prompt(instruction: str, input: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of an instruction's prompt, exactly as training put them before the response; feed them to generate.

    Uses the chat template if `tokenizer` has one, else the Alpaca template (see `formats.render_prompt`).
    """
    return _encode_prompt(make_instruction_example(instruction, input, "", tokenizer), tokenizer)


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


def _encode_prompt(example: Example, tokenizer: PreTrainedTokenizerBase, response_ids: Sequence[int] = ()) -> list[int]:
    """The prompt's ids, led by a BOS when plain text needs one (for a text record: just the BOS)."""
    ids = _encode(tokenizer, example.prompt)
    bos = tokenizer.bos_token_id
    if example.add_special_tokens and _adds_bos(tokenizer) and (ids or list(response_ids))[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does the tokenizer put its BOS in front by itself? Probed, since tokenizers say so in different ways."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos
