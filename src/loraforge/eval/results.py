"""What `loraforge eval` produces: the scored examples, one `ModelResult` row per model, and the `EvalResult` the
report is written from. Plain data: `eval.run` fills them, `eval.report` reads them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.data import Record, Recipe
from loraforge.eval.config import EvalConfig

@dataclass
class EvalExample:
    """One scored input: its record(s) (several when they share the input) and what the metric compares with."""

    records: list[Record]
    references: Any

    @property
    def record(self) -> Record:
        return self.records[0]


@dataclass(kw_only=True)
class ModelResult:
    """One row of the comparison: a model's scores on the examples, its speed, and its outputs."""

    name: str
    base: str
    adapter: str | None
    few_shot: int
    metrics: dict[str, float]
    n: int
    seconds: float
    """Generation (or scoring) time, without loading."""
    load_seconds: float = 0.0
    """Loading the model and adapter."""
    tokens: int
    """Generated tokens (generate) or tokens read (text)."""
    rows: list[dict] = field(default_factory=list)
    """One predictions.jsonl row per example."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "adapter": self.adapter, "few_shot": self.few_shot,
                "metrics": {k: finite_or_none(v) for k, v in self.metrics.items()}, "n": self.n,
                "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "tokens": self.tokens, "tokens_per_second": round(self.tokens_per_second, 1)}


@dataclass
class EvalResult:
    config: EvalConfig
    recipe: Recipe | None
    examples: list[EvalExample]
    models: list[ModelResult]
    shots: list[Record] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def finite_or_none(value: float) -> float | None:
    """NaN (undefined, e.g. NIST with no 5-gram) and inf (overflowed perplexity) are null in results.json."""
    return value if math.isfinite(value) else None
