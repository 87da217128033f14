"""Packing: several short tokenized examples share one row of at most `max_length` tokens, so a batch is mostly
tokens instead of padding.

How the examples stay apart: each example's `position_ids` restart at 0 and the batch carries no attention mask.
transformers 5 (`masking_utils.find_packed_sequence_indices`) reads a restart (a step other than +1) as a new
sequence and builds a block-diagonal causal mask, so a token attends only within its own example, and rotary or
learned position embeddings see each example from position 0. `masking_utils._preprocess_mask_arguments` does this
only when `attention_mask` is None and `past_key_values` is None. The second means **`use_cache=False`**: the
config default (`use_cache=True`) makes the model build an empty `DynamicCache` in training too, which silently
switches the detection off and lets examples attend to each other.

Verified (transformers 5.23, sdpa and eager) for Llama, GPT-2, Mistral, Qwen2, Phi, GPT-NeoX and GPT-J; OPT, Bloom
and Falcon ignore restarts (they derive positions or ALiBi from the attention mask). `packing_supported(model)`
probes the model in hand; where it says no, train on `collate` (padding) instead.

The loss shifts labels by one (position t predicts label t+1), so the last token of one example would predict the
first token of the next. `pack` sets the label of every example's first token to `IGNORE_INDEX`; that label is never
a target when the example is trained alone either, so the packed loss is exactly the unpacked one.
"""
from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.data.tokenize import IGNORE_INDEX, TokenizedExample, check_max_length
from loraforge.errors import LoraforgeError

PROBE_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-8}
"""`packing_supported` accepts a packed-vs-alone logits difference up to this times max |logit|; 2e-2 otherwise."""


@dataclass(frozen=True)
class PackedRow:
    """One row of packed examples, unpadded: `position_ids` restart at 0 at every example."""

    input_ids: list[int]
    labels: list[int]
    """Aligned with `input_ids`; `IGNORE_INDEX` at each example's first token (and wherever the example had it)."""
    position_ids: list[int]
    example_indices: tuple[int, ...]
    """Which examples (indices into `pack`'s input) the row holds, in row order."""
    lengths: tuple[int, ...]
    """Their lengths in tokens, in row order; they sum to `len(input_ids)`."""


def pack(examples: Sequence[TokenizedExample], max_length: int, *, seed: int | None = None) -> list[PackedRow]:
    """Pack `examples` into rows of at most `max_length` tokens; every example lands in exactly one row, whole.

    Best-fit decreasing: examples are taken longest first and each goes into the open row it fills most tightly
    (the fullest row it still fits, the earliest such row on a tie), else a new row. This is the first-fit-decreasing
    family (at most 11/9 of the optimal row count, plus one) and runs in O(n log n) with a sorted list of free
    spaces, where first-fit needs a tree to be as fast. Greedy in file order would keep the data order but wastes
    a row's tail every time a long example follows short ones.

    Deterministic: ties between equal lengths keep input order, and rows come out in the order they were opened
    (longest examples first; shuffle rows per epoch as with unpacked examples). With `seed`, equal-length ties are
    broken by a shuffle seeded with it and the rows are returned in seeded order; the same seed, the same rows.

    Raises `LoraforgeError` for an empty example or one longer than `max_length` (tokenize with the same
    `max_length`, which truncates).
    """
    check_max_length(max_length)
    order = list(range(len(examples)))
    rng = random.Random(seed) if seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: -len(examples[i].input_ids))  # stable: ties keep the (maybe shuffled) order
    members: list[list[int]] = []  # row -> example indices
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted; full rows leave the list
    for i in order:
        n = len(examples[i].input_ids)
        if n == 0 or n > max_length:
            raise LoraforgeError(
                f"example {i} has {n} tokens; packing needs 1 to max_length={max_length}: tokenize with the same "
                "max_length (it truncates) and leave out empty examples"
            )
        k = bisect_left(free, (n, -1))  # the row with the least room that still fits n, earliest on a tie
        if k == len(free):
            row, space = len(members), max_length
            members.append([])
        else:
            space, row = free.pop(k)
        members[row].append(i)
        if space > n:
            insort(free, (space - n, row))
    rows = [_make_row(examples, idx) for idx in members]
    if rng is not None:
        rng.shuffle(rows)
    return rows


def _make_row(examples: Sequence[TokenizedExample], indices: list[int]) -> PackedRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for i in indices:
        ex = examples[i]
        input_ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]  # the first token is never predicted from the previous example
        position_ids += range(len(ex.input_ids))
    lengths = tuple(len(examples[i].input_ids) for i in indices)
    return PackedRow(input_ids, labels, position_ids, tuple(indices), lengths)


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed `rows` into tensors of shape (B, T), T the longest row.

    Returns int64 `input_ids` (padding = `pad_id`), `labels` (`IGNORE_INDEX` on padding) and `position_ids`
    (padding is one more segment, counting from 0, so it attends only to itself), no `attention_mask` (a mask
    would switch off the packed-sequence detection), and `num_tokens`, a 0-d tensor: the real tokens in the batch.
    Call the model with `input_ids`, `position_ids`, `use_cache=False` and nothing else from this dict.
    """
    if not rows:
        raise ValueError("collate_packed() needs at least one row")
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[b, n:] = torch.arange(T - n)  # the padding segment
    num_tokens = torch.tensor(sum(len(r.input_ids) for r in rows), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}


def padding_fraction(batches: Iterable[Sequence[int]]) -> float:
    """Share of a run's (B, T) tensors that is padding, each batch given by its rows' lengths and padded to its
    longest row: 1 - sum(lengths) / sum(B * max(lengths)). Works for example lengths and packed-row lengths alike."""
    real = total = 0
    for lengths in batches:
        if lengths:
            real += sum(lengths)
            total += len(lengths) * max(lengths)
    return 1.0 - real / total if total else 0.0


@torch.no_grad()
def packing_supported(model: nn.Module) -> bool:
    """True when `model` keeps packed examples apart given restarting `position_ids`, no mask and `use_cache=False`.

    Probes the model in hand (its architecture, attention implementation and dtype): one batch of two 9-token
    rows, [a b] and [b c], with positions restarting at each segment; `b`'s logits must be the same after `a` as at
    the start of a row. Runs in eval mode (dropout off) and puts every module's train/eval flag back afterwards.
    """
    return _probe_difference(model) <= PROBE_RTOL.get(_dtype_of(model), 2e-2)


def _probe_difference(model: nn.Module) -> float:
    """max |logits of b after a - logits of b alone| / max(1, max |logits|), from one packed forward pass."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(vocab, (n,), generator=gen) for n in (5, 4, 5))
    input_ids = torch.stack([torch.cat([a, b]), torch.cat([b, c])])  # (2, 9)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3, 4]])  # (2, 9)
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        logits = model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False).logits
    finally:
        for m, training in modes:
            m.training = training
    after_a, alone = logits[0, 5:].float(), logits[1, :4].float()  # (4, vocab) each
    return ((after_a - alone).abs().max() / alone.abs().max().clamp(min=1.0)).item()


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
