"""Batched decoding for predict/eval: greedy through the engine and beam search through the session's model give
transformers' tokens for each prompt alone."""
from __future__ import annotations

import pytest
import torch

from fixtures.tiny_models import EOS, tiny_gpt2, tiny_llama, tiny_tokenizer
from helpers import hf_generate, session_of
from loraforge.errors import LoraforgeError
from loraforge.infer.batch import BatchOptions, generate_batch, left_pad

torch.set_num_threads(1)  # tiny models gain nothing from threads; other test runs share the 2 cores


def _prompts(vocab: int, lengths: tuple[int, ...] = (3, 9, 1, 6, 12, 4, 7), seed: int = 3) -> list[list[int]]:
    """Prompts of mixed lengths, no special tokens (ids 4 and up), fixed by the seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def _model_and_tokenizer(kind: str):
    model = tiny_llama(seed=1) if kind == "llama" else tiny_gpt2(seed=1)
    tokenizer = tiny_tokenizer(add_bos=kind == "llama")
    return session_of(model, tokenizer), tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_tokenizer(request):
    return _model_and_tokenizer(request.param)


def test_left_pad_puts_padding_first() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("batch_size", [3, 7])
def test_batched_greedy_equals_one_by_one(model_and_tokenizer, batch_size: int) -> None:
    session, tokenizer = model_and_tokenizer
    prompts = _prompts(session.model.config.vocab_size)
    single = [hf_generate(session.model, tokenizer, p, 10) for p in prompts]
    batched = generate_batch(session, prompts, BatchOptions(max_new_tokens=10, batch_size=batch_size))
    assert batched == single
    assert all(len(ids) >= 1 for ids in batched)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rows_stop_at_eos_and_drop_padding(kind: str) -> None:
    """Rows that meet EOS end there while the batch goes on: no pad ids after it, still equal to one by one."""
    session, tokenizer = _model_and_tokenizer(kind)
    head = session.model.get_output_embeddings().weight  # (V, H)
    with torch.no_grad():
        head[EOS] = 1.5 * head[35]  # EOS wins wherever token 35 would have: some rows stop early, some never
    prompts = _prompts(session.model.config.vocab_size)
    single = [hf_generate(session.model, tokenizer, p, 10) for p in prompts]
    batched = generate_batch(session, prompts, BatchOptions(max_new_tokens=10, batch_size=4))
    assert batched == single
    assert any(ids[-1] == EOS and len(ids) < 10 for ids in batched)
    assert any(len(ids) == 10 and EOS not in ids for ids in batched)
    assert all(EOS not in ids[:-1] for ids in batched)


def test_beam_search_batched_equals_one_by_one(model_and_tokenizer) -> None:
    session, tokenizer = model_and_tokenizer
    prompts = _prompts(session.model.config.vocab_size)
    greedy = generate_batch(session, prompts, BatchOptions(max_new_tokens=8, batch_size=4))
    options = BatchOptions(max_new_tokens=8, batch_size=4, num_beams=3)
    beams = generate_batch(session, prompts, options)
    alone = [generate_batch(session, [p], options)[0] for p in prompts]
    assert beams == alone
    assert all(1 <= len(ids) <= 8 for ids in beams)
    assert beams != greedy  # the search did something: on these prompts some best beams differ from greedy


def test_options_are_checked() -> None:
    with pytest.raises(LoraforgeError, match="num_beams"):
        BatchOptions(num_beams=0)
    with pytest.raises(LoraforgeError, match="empty"):
        generate_batch(session_of(tiny_llama(), tiny_tokenizer()), [[4, 5], []])
