"""Input checks shared by the metrics: one prediction per example, at least one non-blank reference each."""
from __future__ import annotations

from collections.abc import Sequence

from loraforge.errors import LoraforgeError

Scores = dict[str, float]


def same_length(predictions: Sequence[object], references: Sequence[object], metric: str) -> None:
    """Refuse an empty set or a count mismatch, naming the metric and both counts."""
    if len(predictions) != len(references):
        raise LoraforgeError(
            f"{metric}: {len(predictions)} predictions for {len(references)} references; give one per example."
        )
    if not predictions:
        raise LoraforgeError(f"{metric}: no examples to score.")


def reference_lists(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], metric: str
) -> list[list[str]]:
    """One list of references per example (a bare string is one reference); none may be missing or blank."""
    same_length(predictions, references, metric)
    out = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for i, refs in enumerate(out):
        if not refs or any(not r.strip() for r in refs):
            raise LoraforgeError(f"{metric}: example {i} has no reference or a blank one: {refs!r}.")
    return out
