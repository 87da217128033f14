"""An encoder head's forward over encoded examples, and its score: shared by training's validation and `predict`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.data import IGNORE_INDEX
from loraforge.data.encode import EncodedExample, HeadSpec, collate_head
from loraforge.metrics import accuracy_macro_f1, entity_f1


@torch.no_grad()
def run_head(model: nn.Module, examples: list[EncodedExample], spec: HeadSpec, pad_id: int,
             batch_size: int = 16) -> tuple[list[str | list[str]], float, int]:
    """(predictions, summed cross-entropy, labelled count) over `examples`, in eval mode; the loss counts
    examples (seq-cls) or words (token-cls) whose label is known."""
    was_training = model.training
    model.eval()
    predictions: list[str | list[str]] = []
    loss_sum, count = 0.0, 0
    outside = "O" if "O" in spec.labels else spec.labels[0]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_head(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # (B, K) for seq-cls, (B, T, K) for token-cls
        labels = batch["labels"]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="sum").nan_to_num().item()
        count += int((labels != IGNORE_INDEX).sum())
        best = logits.argmax(-1).tolist()  # (B,) or (B, T)
        for row, example in enumerate(chunk):
            if spec.task == "seq-cls":
                predictions.append(spec.labels[best[row]])
            else:
                predictions.append([spec.labels[best[row][p]] if p >= 0 else outside for p in example.word_starts])
    model.train(was_training)
    return predictions, loss_sum, count


def score_head(spec: HeadSpec, predictions: list, references: list) -> dict[str, float]:
    """accuracy_macro_f1 over the head's labels (seq-cls), or seqeval's entity F1 (token-cls)."""
    if spec.task == "seq-cls":
        return accuracy_macro_f1(predictions, references, labels=list(spec.labels))
    return entity_f1(predictions, references)
