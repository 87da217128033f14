"""Causal-LM loss that computes logits only where a label is learned, a chunk at a time.

transformers' `model(labels=...)` builds the full (B, T, vocab) logits tensor: 2048 tokens x 49,152 vocab is 400 MB
in fp32, mostly for prompt and padding positions whose loss is thrown away. Here the decoder body runs once, the
hidden states of learned positions are gathered, and the output head runs on those only, a chunk at a time.

With a frozen head (the usual LoRA case) the chunks are fused with their gradient (`LinearCrossEntropy`): the
gradient of cross-entropy with respect to the logits is softmax - onehot, known in the forward pass, so each chunk's
contribution to d(loss)/d(hidden) is computed there and its logits are dropped at once. Nothing of size
(tokens, vocab) is kept for backward and nothing is recomputed: peak memory is one (CHUNK_ROWS, vocab) block. A
packed head (`--quantize nf4-all`) is unpacked a panel of vocabulary rows at a time, twice a chunk (the logits, then
the gradient), never whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.data import IGNORE_INDEX
from loraforge.models import has_plain_head
from loraforge.quant.linear import QuantLinear

CHUNK_ROWS = 1024


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) for a frozen head, gradient computed chunk by chunk in forward.

    Shapes: hidden (N, H), weight (V, H) or a packed head (`QuantLinear`), bias (V,) or None, targets (N,). Returns a
    0-d fp32 sum. With label smoothing e the target distribution is (1 - e) onehot + e / V, as
    `F.cross_entropy(label_smoothing=e)`: the loss adds e (lse - mean logit) to (1 - e) (lse - target logit), and
    d loss / d logits is softmax - that distribution.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, smoothing=0.0):
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _logits(hidden[rows], weight, bias)  # (c, V) fp32
            target = targets[rows]
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            nll = lse - logits.gather(1, target[:, None]).squeeze(1)  # (c,)
            if smoothing:
                nll = (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(dim=-1))
            total += nll.sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
            if smoothing:
                probs.sub_(smoothing / probs.shape[1])
            probs[torch.arange(target.shape[0], device=probs.device), target] -= 1.0 - smoothing  # d CE / d logits
            grad_hidden[rows] = _times_weight(probs, weight)  # (c, V) @ (V, H)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor | QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T + bias in fp32, from a dense weight or a packed head's panels."""
    if isinstance(weight, torch.Tensor):
        return F.linear(hidden, weight, bias).float()
    return weight.linear_by_panels(hidden, bias, torch.float32)


def _times_weight(probs: torch.Tensor, weight: torch.Tensor | QuantLinear) -> torch.Tensor:
    """probs (c, V) @ weight (V, H) in the weight's dtype, from a dense weight or a packed head's panels."""
    if isinstance(weight, torch.Tensor):
        return probs.to(weight.dtype) @ weight
    return weight.times_by_panels(probs, weight.dtype)


def _frozen_linear(head: nn.Module) -> bool:
    """A head whose weight gets no gradient: a frozen `nn.Linear`, or a packed one (always frozen)."""
    if isinstance(head, QuantLinear):
        return head.bias is None or not head.bias.requires_grad
    return type(head) is nn.Linear and not head.weight.requires_grad and \
        (head.bias is None or not head.bias.requires_grad)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over learned tokens: the number transformers' `model(**batch).loss` gives."""
    total, count = token_loss_sum(model, batch)
    return total / max(count, 1)


class CausalLMLoss(nn.Module):
    """A causal LM and its loss as one module: `forward(batch)` is the sum of cross-entropy over the batch's learned
    tokens. torch.compile, DDP and FSDP2 wrap this module, so the whole loss computation (the body, the head, the
    fused cross-entropy) runs inside what they trace, synchronise and shard; reaching into the model from outside
    would bypass them."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}  # tensors only: no counts for guards
        return token_loss_sum(self.model, inputs, self.label_smoothing)[0]


def learned_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: labels after the one-position shift that are not IGNORE_INDEX."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
                   ) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over learned tokens, their count). Summing lets gradient accumulation weight every
    token equally across micro-batches of different sizes. `label_smoothing` is `F.cross_entropy`'s.

    A packed batch carries `position_ids` (restarting at each example) and no attention_mask: transformers then
    builds a block-diagonal causal mask, so examples sharing a row never attend to each other.
    """
    labels = batch["labels"]  # (B, T)
    count = learned_token_count(batch)
    if not has_plain_head(model):
        inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS and (k != "labels" or not label_smoothing)}
        out = model(**inputs, use_cache=False)
        if not label_smoothing:
            return out.loss * count, count
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=label_smoothing), count
    body = getattr(model, model.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS and k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]  # (N, H), N learned tokens
    targets = targets[keep]  # (N,)
    head = model.get_output_embeddings()
    if _frozen_linear(head):
        weight = head if isinstance(head, QuantLinear) else head.weight
        return LinearCrossEntropy.apply(hidden, weight, head.bias, targets, CHUNK_ROWS, label_smoothing), count
    if hidden.shape[0] <= CHUNK_ROWS:
        return _head_ce_sum(head, hidden, targets, label_smoothing), count
    # Several chunks: each chunk's logits are recomputed in backward instead of kept, so at most one
    # (CHUNK_ROWS, vocab) block exists at a time. Costs one extra head forward per learned token.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        total = total + checkpoint(_head_ce_sum, head, hidden[start:start + CHUNK_ROWS],
                                   targets[start:start + CHUNK_ROWS], label_smoothing, use_reentrant=False)
    return total, count


def _head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
                 ) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)


_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
