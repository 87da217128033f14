"""An encoder head's forward over encoded examples, and its score: shared by training's validation and `predict`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.data import IGNORE_INDEX
from loraforge.data.encode import EncodedExample, HeadSpec, collate_head
from loraforge.metrics import accuracy_macro_f1, entity_f1


@dataclass
class HeadOutput:
    """A head's answers over examples: the label (seq-cls) or one tag per word (token-cls), the probabilities
    (seq-cls: every label's; token-cls: each chosen tag's), and the summed cross-entropy over `count` labelled
    examples (seq-cls) or words (token-cls)."""

    predictions: list[str | list[str]] = field(default_factory=list)
    probabilities: list[dict[str, float] | list[float]] = field(default_factory=list)
    loss_sum: float = 0.0
    count: int = 0


@torch.no_grad()
def run_head(model: nn.Module, examples: list[EncodedExample], spec: HeadSpec, pad_id: int,
             batch_size: int = 16) -> HeadOutput:
    """The head's predictions, probabilities and loss over `examples`, in eval mode."""
    was_training = model.training
    model.eval()
    out = HeadOutput()
    outside = "O" if "O" in spec.labels else spec.labels[0]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_head(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # (B, K) for seq-cls, (B, T, K) for token-cls
        labels = batch["labels"]
        out.loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum").nan_to_num().item()
        out.count += int((labels != IGNORE_INDEX).sum())
        probs = logits.softmax(-1)
        top, best = probs.max(-1)  # (B,) or (B, T)
        best, top, probs = best.tolist(), top.tolist(), probs.tolist()
        for row, example in enumerate(chunk):
            if spec.task == "seq-cls":
                out.predictions.append(spec.labels[best[row]])
                out.probabilities.append({name: round(p, 6) for name, p in zip(spec.labels, probs[row])})
            else:  # a word cut off by max_length is "O", with probability 1
                out.predictions.append([spec.labels[best[row][p]] if p >= 0 else outside for p in example.word_starts])
                out.probabilities.append([round(top[row][p], 6) if p >= 0 else 1.0 for p in example.word_starts])
    model.train(was_training)
    return out


def score_head(spec: HeadSpec, predictions: list, references: list) -> dict[str, float]:
    """accuracy_macro_f1 over the head's labels (seq-cls), or seqeval's entity F1 (token-cls)."""
    if spec.task == "seq-cls":
        return accuracy_macro_f1(predictions, references, labels=list(spec.labels))
    return entity_f1(predictions, references)
