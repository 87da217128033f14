"""Batched deterministic decoding for predict and eval: greedy through the engine (`infer.engine`, mixed adapters
and continuous batching), beam search through transformers' `generate` on the session's model with every row on one
adapter (`InferenceSession.use`).

For beam search, prompts of different lengths are LEFT-padded, so every row's last prompt token sits in the same
column and the new tokens are appended in step; the attention mask hides the padding, and `generate` derives each
row's position ids from the mask (`cumsum - 1`), so a padded row sees exactly the positions it would see alone.

A row stops at the first stop token (EOS, or the chat template's end-of-turn when the generation config lists it);
`generate` pads finished rows with the pad id, which is cut off here, so each returned list is what the row
generated, ending with its stop token if it met one within `max_new_tokens`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import SamplingParams, stop_ids
from loraforge.infer.generate import generate_many
from loraforge.infer.session import InferenceSession


@dataclass(frozen=True)
class BatchOptions:
    """How to decode a batch. Deterministic: greedy (`num_beams=1`) or beam search."""

    max_new_tokens: int = 64
    """Tokens to generate at most per prompt (the stop token counts)."""
    num_beams: int = 1
    """1 = greedy; more = beam search keeping that many hypotheses per prompt (returns the best one)."""
    batch_size: int = 8
    """Prompts per `generate` call. Prompts are sorted by length first, so a batch holds similar lengths."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoraforgeError(f"{name} must be a whole number of at least 1, got {value!r}")


@torch.no_grad()
def generate_batch(session: InferenceSession, prompts: Sequence[Sequence[int]], options: BatchOptions = BatchOptions(),
                   adapter: str | None = None) -> list[list[int]]:
    """The new token ids for each prompt (in the order given) on `adapter` (None: the base); `options.batch_size`
    rows decode together, longest prompts first."""
    if any(len(p) == 0 for p in prompts):
        raise LoraforgeError("a prompt is empty: every prompt needs at least one token to continue")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    if options.num_beams == 1:
        params = SamplingParams(max_new_tokens=options.max_new_tokens)
        outputs = generate_many(session, [list(prompts[i]) for i in order], params, [adapter] * len(order),
                                max_batch=options.batch_size)
        for i, ids in zip(order, outputs):
            results[i] = ids
        return results
    with session.use(adapter) as model:
        for start in range(0, len(order), options.batch_size):
            rows = order[start:start + options.batch_size]
            for i, ids in zip(rows, _beam_rows(model, session.tokenizer, [prompts[i] for i in rows], options)):
                results[i] = ids
    return results


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) int64, T the longest prompt, padding on the left."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)  # (B, T)
    for row, p in enumerate(prompts):
        input_ids[row, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, T - len(p):] = 1
    return input_ids, attention_mask


def _beam_rows(model: nn.Module, tokenizer, prompts: list[Sequence[int]], options: BatchOptions) -> list[list[int]]:
    stops = stop_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    input_ids, attention_mask = left_pad(prompts, pad_id)  # (B, T)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=options.max_new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=options.num_beams,
        num_return_sequences=1, pad_token_id=pad_id, eos_token_id=stops or None,
    )  # (B, T + new)
    new = out[:, input_ids.shape[1]:].tolist()  # (B, new)
    return [_until_stop(ids, set(stops)) for ids in new]


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """The ids up to and including the first stop id: what follows it is the batch's padding."""
    for k, token in enumerate(ids):
        if token in stops:
            return ids[:k + 1]
    return ids
