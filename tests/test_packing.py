"""Packing: packed rows give each example exactly the logits and loss it gets alone, on tiny Llama and GPT-2.

The equality holds only with `use_cache=False` and no attention mask (see `loraforge.data.packing`); one test pins
the leak that appears without `use_cache=False`, so a transformers upgrade that changes the rule shows up here.
The padding fractions of the bundled sample are pinned by the integration test at the end, which regenerates them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from helpers import BUILDERS, VOCAB
from loraforge.data import IGNORE_INDEX, TokenizedExample, load_examples
from loraforge.data.packing import (
    PackedRow,
    _probe_difference,
    collate_packed,
    pack,
    packing_supported,
    padding_fraction,
)
from loraforge.errors import LoraforgeError
from tolerances import FP32, max_abs_diff

X = IGNORE_INDEX
LENGTHS = [6, 5, 4, 3, 2, 2, 1, 1]
MAX_LEN = 8
DECODERS = ["llama", "gpt2"]


def make_examples(lengths: list[int], *, seed: int = 3, prompt: int = 0) -> list[TokenizedExample]:
    """Random-token examples; the first `prompt` tokens of each are unlearned, the rest learned (a text chunk if 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        k = min(prompt, n - 1)
        out.append(TokenizedExample(ids, [X] * k + ids[k:]))
    return out


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """An architecture that ignores restarting position ids: OPT derives positions from the attention mask."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                       max_position_embeddings=64, word_embed_proj_dim=16, init_std=0.3, dropout=0.0)
    return OPTForCausalLM(config).eval()


def shifted_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of position t predicting label t+1, and the number of targets."""
    targets = labels[..., 1:].reshape(-1)  # (N,)
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()  # (N, vocab)
    return F.cross_entropy(flat, targets, ignore_index=X, reduction="sum"), int((targets != X).sum())


# --- pack -----------------------------------------------------------------------------------------------------------


def test_best_fit_decreasing_rows() -> None:
    # 6 opens row 0 (2 free), 5 row 1 (3 free), 4 row 2 (4 free); 3 fills row 1, 2 fills row 0, 2+1+1 fill row 2
    rows = pack(make_examples(LENGTHS), MAX_LEN)
    assert [r.example_indices for r in rows] == [(0, 4), (1, 3), (2, 5, 6, 7)]
    assert [r.lengths for r in rows] == [(6, 2), (5, 3), (4, 2, 1, 1)]
    assert [len(r.input_ids) for r in rows] == [8, 8, 8]


def test_every_example_once_and_whole() -> None:
    examples = make_examples([7, 1, 3, 8, 2, 5, 5, 4, 6, 1, 2, 3], prompt=2)
    rows = pack(examples, MAX_LEN)
    assert sorted(i for r in rows for i in r.example_indices) == list(range(len(examples)))
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == sum(row.lengths) <= MAX_LEN
        start = 0
        for i, n in zip(row.example_indices, row.lengths):
            assert row.input_ids[start:start + n] == examples[i].input_ids
            assert row.labels[start + 1:start + n] == examples[i].labels[1:]
            start += n


def test_position_ids_restart_at_every_example() -> None:
    rows = pack(make_examples(LENGTHS), MAX_LEN)
    assert [r.position_ids for r in rows] == [
        [0, 1, 2, 3, 4, 5, 0, 1],
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 0, 0],
    ]


def test_first_token_of_each_example_is_never_a_target() -> None:
    examples = make_examples(LENGTHS)  # text chunks: every label learned, the first one too
    assert all(ex.labels[0] != X for ex in examples)
    for row in pack(examples, MAX_LEN):
        starts = [sum(row.lengths[:k]) for k in range(len(row.lengths))]
        assert all(row.labels[s] == X for s in starts)
        # shifted: the last token of each example (position s - 1) predicts labels[s], which is unlearned
        assert all(row.labels[1:][s - 1] == X for s in starts if s > 0)


def test_packing_is_deterministic() -> None:
    examples = make_examples([3, 3, 3, 2, 2, 5, 1, 4, 3, 2])
    assert pack(examples, MAX_LEN) == pack(examples, MAX_LEN)
    assert pack(examples, MAX_LEN, seed=1) == pack(examples, MAX_LEN, seed=1)
    with_seed = pack(examples, MAX_LEN, seed=1)
    assert sorted(i for r in with_seed for i in r.example_indices) == list(range(len(examples)))
    assert [r.example_indices for r in pack(examples, MAX_LEN, seed=2)] != [r.example_indices for r in with_seed]


@pytest.mark.parametrize("lengths", [[9], [0]])
def test_pack_refuses_examples_that_do_not_fit(lengths: list[int]) -> None:
    examples = [TokenizedExample([1] * n, [1] * n) for n in lengths]
    with pytest.raises(LoraforgeError, match=f"example 0 has {lengths[0]} tokens; packing needs 1 to max_length=8"):
        pack(examples, MAX_LEN)


# --- collate_packed -------------------------------------------------------------------------------------------------


def test_collate_packed_pads_with_its_own_segment() -> None:
    rows = [PackedRow([5, 6, 7, 8], [X, 6, X, 8], [0, 1, 0, 1], (0, 1), (2, 2)), PackedRow([9], [X], [0], (2,), (1,))]
    batch = collate_packed(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}  # no attention_mask, on purpose
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, X, 8], [X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert batch["num_tokens"].item() == 5


def test_padding_fraction() -> None:
    assert padding_fraction([[3, 5], [4, 4]]) == pytest.approx(1 - 16 / 18)
    assert padding_fraction([]) == 0.0


# --- the model sees each example as if it were alone ----------------------------------------------------------------


def packed_batch(seed: int = 3) -> tuple[list[TokenizedExample], list[PackedRow], dict[str, torch.Tensor]]:
    # 24 tokens per row at most: three rows of unequal length, so the batch carries a padding segment
    examples = make_examples([9, 4, 7, 12, 3, 5, 2, 6, 1, 8], seed=seed, prompt=2)
    rows = pack(examples, 24)
    return examples, rows, collate_packed(rows, pad_id=0)


@pytest.mark.parametrize("arch", DECODERS)
def test_packed_logits_equal_each_example_alone(arch: str) -> None:
    model = BUILDERS[arch]()
    examples, rows, batch = packed_batch()
    assert len({len(r.input_ids) for r in rows}) > 1  # padding is present
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(rows):
            start = 0
            for i, n in zip(row.example_indices, row.lengths):
                alone = model(input_ids=torch.tensor([examples[i].input_ids])).logits[0]  # (n, vocab)
                assert max_abs_diff(packed[b, start:start + n], alone) < FP32, (arch, b, i)
                start += n


@pytest.mark.parametrize("arch", DECODERS)
def test_without_use_cache_false_examples_attend_to_each_other(arch: str) -> None:
    # the config default use_cache=True builds a DynamicCache, and transformers skips packed-sequence detection
    model = BUILDERS[arch]()
    examples, rows, batch = packed_batch()
    row = rows[0]
    second, n = row.example_indices[1], row.lengths[1]
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1]).logits[0]
        alone = model(input_ids=torch.tensor([examples[second].input_ids])).logits[0]
    assert max_abs_diff(leaky[row.lengths[0]:row.lengths[0] + n], alone) > 0.1


@pytest.mark.parametrize("arch", DECODERS)
def test_packed_loss_is_token_weighted_mean_of_example_losses(arch: str) -> None:
    model = BUILDERS[arch]()
    examples, _, batch = packed_batch()
    per_example = []
    with torch.no_grad():
        for ex in examples:
            n_targets = sum(label != X for label in ex.labels[1:])
            if n_targets:  # the 1-token example teaches nothing: weight 0 (its own mean loss is nan)
                out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
                per_example.append((out.loss.item(), n_targets))
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=False)
        total, n = shifted_loss_sum(packed.logits, batch["labels"])
    expected = sum(loss * k for loss, k in per_example) / sum(k for _, k in per_example)
    assert n == sum(k for _, k in per_example)
    assert abs(packed.loss.item() - expected) < FP32
    assert abs(total.item() / n - expected) < FP32


@pytest.mark.parametrize("arch", DECODERS)
def test_train_loss_on_a_packed_batch_equals_unpacked(arch: str) -> None:
    # the wiring in train/loss.py: it passes position_ids, no attention_mask and use_cache=False to the body
    from loraforge.data import collate
    from loraforge.train.loss import causal_lm_loss

    model = BUILDERS[arch]()
    examples, _, batch = packed_batch()
    with torch.no_grad():
        packed = causal_lm_loss(model, batch)
        padded = causal_lm_loss(model, collate(examples, pad_id=0))
    assert abs(packed.item() - padded.item()) < FP32


# --- which architectures honour it ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", DECODERS)
def test_llama_and_gpt2_support_packing(arch: str) -> None:
    model = BUILDERS[arch]()
    assert _probe_difference(model) < FP32
    assert packing_supported(model)


def test_opt_does_not_and_falls_back_to_padding() -> None:
    # OPT computes positions from the attention mask: packed examples leak. The fallback, `collate` with padding
    # and an attention mask, is what the caller uses when `packing_supported` says no.
    from loraforge.data import collate

    model = tiny_opt()
    assert _probe_difference(model) > 0.1
    assert not packing_supported(model)
    examples = make_examples([5, 3, 4], prompt=1)
    padded = collate(examples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        for b, ex in enumerate(examples):
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            assert max_abs_diff(logits[b, :len(ex.input_ids)], alone) < FP32


def test_probe_restores_train_mode() -> None:
    model = BUILDERS["llama"]().train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    assert packing_supported(model)
    assert [m.training for m in model.modules()] == before


# --- the efficiency number ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_padding_fraction_on_the_bundled_sample(default_model_dir) -> None:
    """Regenerates the numbers in the report: e2e_demo.jsonl, SmolLM2 tokenizer, max_length 256, batch 8."""
    from transformers import AutoTokenizer

    from loraforge.demo import sample_path
    from loraforge.train.loop import batch_order

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    examples, _ = load_examples(sample_path("e2e_demo.jsonl"), tokenizer, 256)
    B = 8
    lengths = [len(ex.input_ids) for ex in examples]
    rows = [len(r.input_ids) for r in pack(examples, 256)]

    def in_order(xs: list[int]) -> list[list[int]]:
        return [xs[i:i + B] for i in range(0, len(xs), B)]

    def shuffled(xs: list[int]) -> list[list[int]]:  # one epoch in the training loop's seeded order
        return [[xs[i] for i in idx] for idx in batch_order(len(xs), B, len(xs) // B, seed=0)]

    assert (len(lengths), sum(lengths), len(rows)) == (300, 31058, 142)
    assert round(padding_fraction(in_order(lengths)), 4) == 0.1593
    assert round(padding_fraction(shuffled(lengths)), 4) == 0.1588
    assert round(padding_fraction(in_order(rows)), 4) == 0.0398
    assert round(padding_fraction(shuffled(rows)), 4) == 0.1230
