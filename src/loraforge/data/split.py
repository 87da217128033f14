"""Seeded subsets of a data set: a train/validation split, and few-shot samples (16, 32, 64 ... examples).

Both work on anything: `Record`s before formatting (so a few-shot subset of a large file is drawn while reading it),
`Example`s or `TokenizedExample`s. Randomness comes from `random.Random(seed)` only, so a seed fixes the result on
every machine and Python version, and nothing depends on torch's global RNG.

Few-shot allocation, exactly (`stratified_counts`): with N items, N_c of class c, and n drawn, class c's quota is
q_c = n * N_c / N. Each class gets floor(q_c), raised to 1 if n >= the number of classes; then, while the total is
below n, one more goes to the class with the largest q_c - count (ties: the larger class, then the class seen
first); while it is above n, one is taken from the class with the smallest q_c - count among those with more than
one (same ties). This is largest-remainder (Hamilton) apportionment with a floor of one per class.
Example: 32 from 70 of "pos" and 30 of "neg": quotas 22.4 and 9.6, floors 22 + 9 = 31, the larger remainder
(0.6) gives "neg" the last one: 22 pos + 10 neg.
"""
from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from loraforge.data.readers import Record
from loraforge.errors import LoraforgeError

T = TypeVar("T")


def train_val_split(examples: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split `examples` into (train, val), each in input order; val holds round(val_fraction * N) of them (at
    least 1, and at least 1 is left for training), chosen by a shuffle seeded with `seed`."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise LoraforgeError(
            f"val_fraction is {val_fraction!r}; give a fraction between 0 and 1, e.g. 0.1 for 10% validation"
        )
    n = len(examples)
    if n < 2:
        raise LoraforgeError(f"a train/validation split needs at least 2 examples; the data has {n}")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def sample_few_shot(items: Iterable[T], n: int, seed: int, label_key: str | None = None) -> list[T]:
    """Draw `n` items with a fixed seed, returned in input order; `items` is read once, as a stream.

    Without `label_key`: a uniform sample by reservoir sampling (holds n items, never the whole input).
    With `label_key`: stratified by the label (`record.fields[key]`, `item[key]` or `item.key`), counts per class by
    `stratified_counts` (see the module docstring). One pass with a reservoir of up to n items per class, then a
    seeded sub-sample of each reservoir: holds at most n x (number of classes) items, plus a count per class.
    Raises `LoraforgeError` if n < 1 or the input has fewer than n items, or an item has no label.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LoraforgeError(f"n is {n!r}; give how many examples to draw, a whole number of at least 1 (e.g. 32)")
    rng = random.Random(seed)
    if label_key is None:
        picked, total = _reservoir(enumerate(items), n, rng)
        if total < n:
            raise LoraforgeError(f"asked for {n} examples but the data has only {total}; lower n")
        return [item for _, item in sorted(picked, key=lambda p: p[0])]
    return _stratified(items, n, rng, label_key)


def stratified_counts(class_sizes: Mapping[Hashable, int], n: int) -> dict[Hashable, int]:
    """How many of each class a stratified draw of `n` takes; `class_sizes` in first-seen order (see module doc)."""
    total = sum(class_sizes.values())
    if not 0 < n <= total:
        raise LoraforgeError(f"asked for {n} examples but the data has only {total}; lower n")
    labels = list(class_sizes)
    quota = {c: n * class_sizes[c] / total for c in labels}
    floor = 1 if n >= len(labels) else 0
    counts = {c: max(floor, math.floor(quota[c])) for c in labels}
    rank = {c: (class_sizes[c], -i) for i, c in enumerate(labels)}  # ties: larger class, then seen first
    while sum(counts.values()) < n:
        c = max((c for c in labels if counts[c] < class_sizes[c]), key=lambda c: (quota[c] - counts[c], rank[c]))
        counts[c] += 1
    while sum(counts.values()) > n:
        c = max((c for c in labels if counts[c] > 1), key=lambda c: (counts[c] - quota[c], rank[c]))
        counts[c] -= 1
    return counts


def _reservoir(indexed: Iterable[tuple[int, T]], k: int, rng: random.Random) -> tuple[list[tuple[int, T]], int]:
    """Algorithm R: a uniform sample of k of the stream's (index, item) pairs, and how many the stream had."""
    picked: list[tuple[int, T]] = []
    seen = 0
    for pair in indexed:
        if seen < k:
            picked.append(pair)
        else:
            j = rng.randrange(seen + 1)
            if j < k:
                picked[j] = pair
        seen += 1
    return picked, seen


def _stratified(items: Iterable[T], n: int, rng: random.Random, label_key: str) -> list[T]:
    reservoirs: dict[Hashable, list[tuple[int, T]]] = {}
    sizes: dict[Hashable, int] = {}  # first-seen order
    for index, item in enumerate(items):
        label = _label_of(item, label_key, index)
        seen = sizes.get(label, 0)
        sizes[label] = seen + 1
        reservoir = reservoirs.setdefault(label, [])
        if seen < n:
            reservoir.append((index, item))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                reservoir[j] = (index, item)
    counts = stratified_counts(sizes, n)
    picked = [pair for label in sizes for pair in rng.sample(reservoirs[label], counts[label])]
    return [item for _, item in sorted(picked, key=lambda p: p[0])]


def _label_of(item: Any, key: str, index: int) -> Hashable:
    if isinstance(item, Record):
        fields, where = item.fields, item.where
    else:
        fields, where = item, f"item {index}"
    try:
        label = fields[key] if isinstance(fields, Mapping) else getattr(fields, key)
    except (KeyError, AttributeError):
        raise LoraforgeError(
            f'{where}: has no label field "{key}" for the stratified few-shot sample; '
            "give every record that field, or pass the right label_key"
        ) from None
    if not isinstance(label, Hashable):
        raise LoraforgeError(
            f'{where}: label "{key}" is {label!r}; stratifying needs a single value such as a string or a number'
        )
    return label
