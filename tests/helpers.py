"""Tiny seeded models for the LoRA tests: vocab 64, hidden 16, 2 layers. The same seed gives the same weights,
so calling a builder twice gives two identical, independent bases (one for loraforge, one for peft).

initializer_range is raised from transformers' 0.02 to 0.3 so logits are O(1) and a 1e-5 tolerance means something.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64
HIDDEN = 16
LAYERS = 2
INIT_RANGE = 0.3


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=INIT_RANGE, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                        initializer_range=INIT_RANGE, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=3,
                        initializer_range=INIT_RANGE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids, fixed by the seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits on `ids` (default: token_ids()), without gradients."""
    return model(input_ids=token_ids() if ids is None else ids).logits


@torch.no_grad()
def hf_generate(model: nn.Module, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy `generate` on one unpadded prompt, cut after the first stop token."""
    from loraforge.infer.engine import stop_ids

    stops = stop_ids(tokenizer, model)
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                         eos_token_id=stops or None, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    for k, token in enumerate(new):
        if token in stops:
            return new[:k + 1]
    return new


def session_of(model: nn.Module, tokenizer, **adapters):
    """An InferenceSession over an in-memory model, with adapters name=folder."""
    from loraforge.infer import InferenceSession

    session = InferenceSession(model, tokenizer, base="tiny")
    for name, folder in adapters.items():
        session.add_adapter(name, folder)
    return session
