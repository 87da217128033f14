"""Teacher-forced scoring with a session's model: the log-likelihood of given continuations, no generation.

- `token_nll`: per row of a batch, the summed cross-entropy over its learned tokens (perplexity, validation sums).
- `score_label_words`: a classification recipe's answer as the label whose words the model finds most likely after
  the prompt, with every label's probability (`eval --answer label-words`, `predict --answer label-words`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loraforge.config import ANSWERS
from loraforge.data import IGNORE_INDEX, Record, collate, pad_id_for
from loraforge.data.recipes import Classification
from loraforge.data.tokenize import TokenizedExample
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import cache_keyword, shared_prefix
from loraforge.infer.session import InferenceSession
from loraforge.models import has_plain_head

HEAD_CHUNK_ROWS = 1024
"""Rows of hidden states put through the output head at once: no (B, T, vocab) tensor."""


def check_answer(answer: str) -> None:
    """A LoraforgeError unless `answer` is one of `ANSWERS` (the CLI's choices; this is the Python API's check)."""
    if answer not in ANSWERS:
        raise LoraforgeError(f"--answer {answer!r}: choose one of {', '.join(ANSWERS)}")


def check_label_words(recipe) -> None:
    """A LoraforgeError unless `recipe` (a Recipe, or None) has label names for `--answer label-words` to score."""
    if not isinstance(recipe, Classification):
        name = getattr(recipe, "name", None) or "no recipe"
        raise LoraforgeError(f"--answer label-words scores the label names of a classification recipe (sst2, "
                             f"pubmedqa); {name} has none")


@torch.no_grad()
def score_label_words(session: InferenceSession, adapter: str | None, recipe: Classification,
                      records: list[Record], prompts: list[list[int]], batch_size: int
                      ) -> tuple[list[list[int]], list[dict[str, float]]]:
    """For each prompt, the continuation (a label name as training writes it, with its end-of-turn or EOS) that
    the model gives the highest probability: log P(continuation | prompt) summed over its tokens, one teacher-forced
    forward per (prompt, label). The prompt may be zero- or few-shot; the continuations come from the recipe's
    own training example, so the answer is always one of the labels, in the form the model was taught. Also each
    label's probability among the labels (the continuations' probabilities, normalized).
    The prompts' shared prefix (`infer.engine.shared_prefix`: the shots of a few-shot prompt) runs once, and each
    row continues from its KV cache: a 32-shot SST-2 prompt of ~1,000 tokens then costs each row its own ~30."""
    tokenizer = session.tokenizer
    rows: list[TokenizedExample] = []
    options: list[list[list[int]]] = []
    for record, prompt in zip(records, prompts):
        conts = [recipe.answer_ids(record, name, tokenizer) for name in recipe.names]
        rows += [TokenizedExample(prompt + cont, [IGNORE_INDEX] * len(prompt) + cont) for cont in conts]
        options.append(conts)
    shared = shared_prefix(prompts)
    nll = torch.empty(len(rows), dtype=torch.float64)
    pad = pad_id_for(tokenizer)
    with session.use(adapter) as model:
        prefix = None
        if shared:  # the shared prefix once, into a cache the forward fills in place
            prefix = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([prompts[0][:shared]]), use_cache=True, **{cache_keyword(model): prefix})
        for first in range(0, len(rows), batch_size):
            batch = [TokenizedExample(r.input_ids[shared:], r.labels[shared:]) for r in rows[first:first + batch_size]]
            past = None
            if prefix is not None:  # a copy per batch: the forward appends the batch's tokens to it
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(batch))
                past = (cache, shared)
            nll[first:first + batch_size] = token_nll(model, collate(batch, pad), past)[0]
    nll = nll.view(len(records), len(recipe.names))
    probs = (-nll).softmax(dim=1).tolist()
    best = nll.argmin(dim=1).tolist()
    return ([conts[k] for conts, k in zip(options, best)],
            [{name: round(p, 6) for name, p in zip(recipe.names, row)} for row in probs])



@torch.no_grad()
def token_nll(model, batch: dict[str, torch.Tensor], past: tuple[Any, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a right-padded batch: summed cross-entropy (natural log, float64) over its learned tokens, and
    their count. The output head runs only on learned positions, a chunk at a time (no (B, T, vocab) tensor).
    `past`: (a KV cache of the batch's size, its length n): every row continues n tokens the cache holds."""
    labels = batch["labels"]  # (B, T)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if past is not None:
        cache, n = past
        mask = batch["attention_mask"]
        inputs.update(attention_mask=torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1), use_cache=True,
                      **{cache_keyword(model): cache})
    if has_plain_head(model):
        hidden = getattr(model, model.base_model_prefix)(**inputs).last_hidden_state[:, :-1][keep]  # (N, H)
        head = model.get_output_embeddings()
        chunks = [head(hidden[s:s + HEAD_CHUNK_ROWS]).float() for s in range(0, hidden.shape[0], HEAD_CHUNK_ROWS)]
        logits = torch.cat(chunks) if chunks else hidden.new_zeros((0, head.out_features))  # (N, V)
    else:
        logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
    nll = F.cross_entropy(logits, targets[keep], reduction="none").double()  # (N,)
    row_of = torch.arange(labels.shape[0])[:, None].expand_as(targets)[keep]  # (N,)
    per_row = torch.zeros(labels.shape[0], dtype=torch.float64).index_add_(0, row_of, nll)  # (B,)
    return per_row, keep.sum(dim=1)
