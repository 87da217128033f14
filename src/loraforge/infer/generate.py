"""Text generation through transformers' `generate` (KV cache), greedy or sampled, on any loaded model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraforge.errors import LoraforgeError


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Greedy is deterministic; sampling uses temperature and top-p with a fixed seed."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise LoraforgeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise LoraforgeError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got "
                                 f"temperature={self.temperature}, top_p={self.top_p}")


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt_ids: list[int], options: GenerationOptions = GenerationOptions()
             ) -> tuple[list[int], str]:
    """Continue `prompt_ids`; returns the new token ids and their text (special tokens removed)."""
    if not prompt_ids:
        raise LoraforgeError("the prompt is empty: give some text to continue")
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)  # (1, T)
    kwargs = dict(max_new_tokens=options.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=stop_ids(tokenizer, model))
    if options.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        torch.manual_seed(options.seed)
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=None)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)  # (1, T+new)
    model.train(was_training)
    new_ids = out[0, len(prompt_ids):].tolist()
    return new_ids, tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def stop_ids(tokenizer, model: nn.Module) -> list[int]:
    """EOS ids from the generation config and tokenizer (chat models stop at their end-of-turn token)."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
