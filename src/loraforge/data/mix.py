"""Joint multi-task training data: several datasets, each read with its own recipe, mixed into one training list.

Mixing probabilities (T5 / mT5 temperature sampling). Dataset i, with n_i training examples and weight w_i, is drawn
with probability

    p_i = (w_i · n_i)^(1/T) / Σ_j (w_j · n_j)^(1/T)

T = 1 with every weight 1 is proportional to size (plain concatenation); as T grows, p_i tends to uniform (1/k for
k datasets); a weight scales a dataset's size (weight 3 on 10 examples weighs as 30 examples would).
Example: sizes 10 and 30 -> 0.25 / 0.75 at T = 1, -> 0.5 / 0.5 as T -> ∞, and 0.5 / 0.5 at T = 1 with weight 3 on
the small one.

The draw is exact, not a random count. An epoch holds N = Σ n_i examples, as plain concatenation does. Dataset i
gets c_i = p_i · N of them, rounded by largest remainder (Hamilton: the floors, then one more each to the largest
fractional parts, ties to the earlier dataset), so Σ c_i = N and the ratios are honoured to one example. Then,
within dataset i, with `random.Random(seed)`: c_i <= n_i takes a sample of c_i examples without replacement;
c_i > n_i (upsampling, the only case where an example repeats) takes every example c_i // n_i times plus a sample
of c_i mod n_i without replacement. The list is shuffled with the same generator: the same seed, the same list.
T = 1 with weights 1 gives every example once.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from loraforge.data.load import MAX_SKIP_REASONS, DataStats, load_examples
from loraforge.data.split import train_val_split
from loraforge.data.tokenize import TokenizedExample
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loraforge.config import MixSpec

T = TypeVar("T")
_EPS = 1e-6  # a quota this close below a whole number is that number (float error in p_i · N)


def mix_probabilities(sizes: Sequence[int], weights: Sequence[float], temperature: float = 1.0) -> list[float]:
    """p_i = (w_i · n_i)^(1/T) / Σ_j (w_j · n_j)^(1/T) (see the module docstring); an empty dataset gets 0."""
    if len(sizes) != len(weights) or not sizes:
        raise LoraforgeError(f"give one weight per dataset: {len(sizes)} sizes, {len(weights)} weights")
    if not 0 < temperature < math.inf:
        raise LoraforgeError(f"the mixing temperature must be a positive number, got {temperature!r}")
    if any(not 0 < w < math.inf for w in weights) or any(n < 0 for n in sizes) or not any(sizes):
        raise LoraforgeError(f"mixing needs positive weights and at least one example: sizes {list(sizes)}, "
                             f"weights {list(weights)}")
    # in log space: (w n)^(1/T) overflows a float for small T
    logs = [math.log(w * n) / temperature if n else -math.inf for n, w in zip(sizes, weights)]
    top = max(logs)
    terms = [math.exp(v - top) for v in logs]
    total = sum(terms)
    return [t / total for t in terms]


def allocate(probabilities: Sequence[float], total: int) -> list[int]:
    """Whole counts summing to `total`, each p_i · total rounded by largest remainder (ties: the earlier one)."""
    quotas = [p * total for p in probabilities]
    counts = [math.floor(q + _EPS) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    left = total - sum(counts)
    if left >= 0:
        for i in by_remainder[:left]:
            counts[i] += 1
    else:  # only when _EPS lifted floors past the total: take back from the smallest remainders
        for i in by_remainder[left:]:
            counts[i] -= 1
    return counts


def draw_mix(datasets: Sequence[Sequence[T]], weights: Sequence[float], temperature: float = 1.0,
             seed: int = 0) -> tuple[list[T], list[int]]:
    """One epoch of the mix: Σ n_i items drawn from `datasets` with `mix_probabilities`, and how many came from
    each (the exact draw of the module docstring). Repeats an item only where its dataset is upsampled."""
    sizes = [len(d) for d in datasets]
    counts = allocate(mix_probabilities(sizes, weights, temperature), sum(sizes))
    rng = random.Random(seed)
    picked: list[tuple[int, int]] = []  # (dataset, index)
    for i, (n, count) in enumerate(zip(sizes, counts)):
        repeats, rest = divmod(count, n) if n else (0, 0)
        picked += [(i, k) for k in list(range(n)) * repeats + sorted(rng.sample(range(n), rest))]
    rng.shuffle(picked)
    return [datasets[i][k] for i, k in picked], counts


@dataclass
class MixPart:
    """One dataset's share of a mix."""

    name: str
    """Its file's stem (`mix[i]:stem` when two files share a stem)."""
    data: str
    recipe: str | None
    weight: float
    examples: int
    """n_i: its training examples (after max_examples and a val_split)."""
    probability: float
    """p_i: its mixing probability."""
    drawn: int
    """c_i: how many of the epoch's examples it gave; more than `examples` when upsampled."""
    stats: DataStats = field(repr=False)
    """What happened to its records."""


@dataclass
class MixStats(DataStats):
    """The counts of every dataset of a mix added up (so the run's summary reads as for one file), and each
    dataset's share."""

    parts: list[MixPart] = field(default_factory=list)
    temperature: float = 1.0

    @classmethod
    def of(cls, parts: list[MixPart], temperature: float) -> MixStats:
        total = cls(parts=parts, temperature=temperature)
        for part in parts:
            s = part.stats
            for name in ("records_read", "used", "skipped", "truncated", "tokens", "target_tokens", "chunks"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            for kind, count in s.formats.items():
                total.formats[kind] = total.formats.get(kind, 0) + count
            total.skip_reasons += s.skip_reasons[:MAX_SKIP_REASONS - len(total.skip_reasons)]
            total.systems |= s.systems
        return total

    def mix_line(self) -> str:
        """e.g. `mix: sst2 1,200 (40%), e2e 1,800 (60%)`, with `(upsampled)` where examples repeat."""
        n = max(sum(p.drawn for p in self.parts), 1)
        return "mix: " + ", ".join(f"{p.name} {p.drawn:,} ({100 * p.drawn / n:.3g}%)"
                                   + (" (upsampled)" if p.drawn > p.examples else "") for p in self.parts)

    def report(self) -> dict:
        """The mix for train_summary.json."""
        n = max(sum(p.drawn for p in self.parts), 1)
        return {"temperature": self.temperature, "datasets": [
            {"name": p.name, "data": p.data, "recipe": p.recipe, "weight": p.weight, "examples": p.examples,
             "probability": round(p.probability, 6), "drawn": p.drawn, "percent": round(100 * p.drawn / n, 2),
             "upsampled": p.drawn > p.examples} for p in self.parts]}


def load_mix(specs: Sequence[MixSpec], tokenizer: PreTrainedTokenizerBase, max_length: int, *,
             temperature: float = 1.0, seed: int = 0, on_bad_record: str = "error", val_data: str | None = None,
             val_split: float = 0.0) -> tuple[list[TokenizedExample], list[TokenizedExample], MixStats]:
    """Load every dataset of a mix with its own recipe and options (`load_examples`, at `max_length`) and draw one
    epoch of training examples (`draw_mix`, seeded with `seed`); returns (train, validation, stats).

    Validation is the union, over the datasets, of each one's `val_data` (read with its recipe) or, without one, its
    `val_split` share (held out before the draw, so no validation example is trained on); a top-level `val_data`
    (records of a detected shape) is the validation set instead.
    """
    trains, val, parts = [], [], []
    names = _names(specs)
    for spec, name in zip(specs, names):
        options = dict(on_bad_record=on_bad_record, **spec.data_recipe(), fmt=spec.data_format,
                       file_format=spec.file_format)
        examples, stats = load_examples(spec.data, tokenizer, max_length, max_examples=spec.max_examples or None,
                                        seed=seed, **options)
        if spec.val_data:
            val += load_examples(spec.val_data, tokenizer, max_length, **options)[0]
        elif val_split and not val_data:
            examples, held_out = train_val_split(examples, val_split, seed)
            val += held_out
        trains.append(examples)
        parts.append(MixPart(name, spec.data, spec.recipe, spec.weight, len(examples), 0.0, 0, stats))
    if val_data:
        val = load_examples(val_data, tokenizer, max_length, on_bad_record=on_bad_record)[0]
    train, counts = draw_mix(trains, [s.weight for s in specs], temperature, seed)
    probabilities = mix_probabilities([len(t) for t in trains], [s.weight for s in specs], temperature)
    for part, p, count in zip(parts, probabilities, counts):
        part.probability, part.drawn = p, count
    return train, val, MixStats.of(parts, temperature)


def _names(specs: Sequence[MixSpec]) -> list[str]:
    stems = [Path(s.data).stem or s.data for s in specs]
    return [stem if stems.count(stem) == 1 else f"mix[{i}]:{stem}" for i, stem in enumerate(stems)]
