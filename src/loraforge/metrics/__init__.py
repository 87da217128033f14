"""Task metrics from the standard libraries, as small functions returning `dict[str, float]`, and `METRICS`, their
names for recipes. A leaf layer: train, infer and eval all score with it."""
from __future__ import annotations

from loraforge.metrics.inputs import Scores
from loraforge.metrics.core import (
    METRICS,
    PUBMEDQA_LABELS,
    ROUGE_TYPES,
    TEXT_METRICS,
    accuracy_macro_f1,
    bleu_nist,
    chrf,
    entity_f1,
    get_metric,
    perplexity,
    perplexity_from_token_losses,
    pubmedqa,
    rouge,
)
from loraforge.metrics.qa import normalize_answer, squad_em_f1, squad_zh_em_f1

MULTI_REFERENCE_METRICS = frozenset({"bleu_nist", "rouge", "squad_em_f1", "squad_zh_em_f1", "chrf", *TEXT_METRICS})
"""Metrics that take several references per example, so records sharing an input are grouped into one example."""

__all__ = [
    "METRICS",
    "MULTI_REFERENCE_METRICS",
    "PUBMEDQA_LABELS",
    "ROUGE_TYPES",
    "Scores",
    "TEXT_METRICS",
    "accuracy_macro_f1",
    "bleu_nist",
    "chrf",
    "entity_f1",
    "get_metric",
    "normalize_answer",
    "perplexity",
    "perplexity_from_token_losses",
    "pubmedqa",
    "rouge",
    "squad_em_f1",
    "squad_zh_em_f1",
]
