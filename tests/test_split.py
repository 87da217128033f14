"""Seeded splits and few-shot samples: the same seed gives the same subset, and stratified counts are exact.

Pinned subsets come from `random.Random(seed)`, whose integer seeding and `shuffle`/`randrange` are stable across
Python versions; rerun the call in the test to regenerate a pinned list.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from loraforge.data.readers import Record
from loraforge.data.split import sample_few_shot, stratified_counts, train_val_split
from loraforge.errors import LoraforgeError


def labelled(n_pos: int = 70, n_neg: int = 30) -> list[dict]:
    """100 records by default, 7 "pos" then 3 "neg" in every ten (interleaved, so input order is not by class)."""
    total = n_pos + n_neg
    return [{"text": f"r{i}", "label": "pos" if i % 10 < 7 else "neg"} for i in range(total)]


def stream(items: list) -> Iterator:
    """A one-pass iterator: a generator cannot be read twice, so this checks that sampling streams."""
    yield from items


# --- train/validation -----------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_in_input_order() -> None:
    train, val = train_val_split(list(range(10)), 0.3, seed=0)
    assert (train, val) == ([0, 2, 3, 4, 5, 6, 9], [1, 7, 8])
    assert train_val_split(list(range(10)), 0.3, seed=0) == (train, val)
    assert train_val_split(list(range(10)), 0.3, seed=1)[1] == [6, 8, 9]


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(100, 0.1, 10), (7, 0.25, 2), (3, 0.01, 1), (3, 0.99, 2)])
def test_split_sizes(n: int, fraction: float, n_val: int) -> None:
    train, val = train_val_split(list(range(n)), fraction, seed=5)
    assert (len(train), len(val)) == (n - n_val, n_val)
    assert sorted(train + val) == list(range(n))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True, "0.1"])
def test_split_rejects_bad_fractions(fraction: object) -> None:
    with pytest.raises(LoraforgeError, match="val_fraction is .*; give a fraction between 0 and 1"):
        train_val_split(list(range(10)), fraction, seed=0)  # type: ignore[arg-type]


def test_split_needs_two_examples() -> None:
    with pytest.raises(LoraforgeError, match="at least 2 examples; the data has 1"):
        train_val_split([0], 0.5, seed=0)


# --- few-shot, plain ------------------------------------------------------------------------------------------------


def test_few_shot_is_seeded_and_streams() -> None:
    assert sample_few_shot(stream(list(range(20))), 4, seed=0) == [1, 2, 5, 6]
    assert sample_few_shot(range(20), 4, seed=0) == [1, 2, 5, 6]  # a list or a stream: the same draw
    assert sample_few_shot(range(20), 4, seed=1) != [1, 2, 5, 6]
    assert sample_few_shot(range(3), 3, seed=0) == [0, 1, 2]


def test_few_shot_is_uniform() -> None:
    # 3 of 10, over 3000 seeds: each item is drawn 900 times on average (sd ~25)
    counts = Counter(i for seed in range(3000) for i in sample_few_shot(range(10), 3, seed=seed))
    assert all(800 < counts[i] < 1000 for i in range(10)), counts


@pytest.mark.parametrize(("n", "message"), [(0, "n is 0"), (True, "n is True"), (11, "only 10")])
def test_few_shot_rejects_bad_n(n: int, message: str) -> None:
    with pytest.raises(LoraforgeError, match=message):
        sample_few_shot(range(10), n, seed=0)


# --- few-shot, stratified -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(16, (11, 5)), (32, (22, 10)), (64, (45, 19)), (100, (70, 30))])
def test_stratified_counts_70_30(n: int, expected: tuple[int, int]) -> None:
    # quotas n*0.7 and n*0.3, floors, then the larger remainder: 32 -> 22.4 / 9.6 -> 22 + 9 + 1 to "neg"
    assert tuple(stratified_counts({"pos": 70, "neg": 30}, n).values()) == expected


def test_stratified_counts_floor_of_one_and_fewer_than_classes() -> None:
    # 10 from 97/2/1: quotas 9.7, 0.2, 0.1 -> floors 9, 0, 0 raised to 9, 1, 1 = 11 -> the over-served "a" gives one
    assert stratified_counts({"a": 97, "b": 2, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    # n below the number of classes: no floor of one; largest remainders win (quotas 1.0, 0.6, 0.4)
    assert stratified_counts({"a": 5, "b": 3, "c": 2}, 2) == {"a": 1, "b": 1, "c": 0}
    # equal remainders: the class seen first
    assert stratified_counts({"x": 1, "y": 1}, 1) == {"x": 1, "y": 0}


def test_stratified_sample_counts_order_and_seed() -> None:
    records = labelled()
    picked = sample_few_shot(stream(records), 32, seed=0, label_key="label")
    assert Counter(r["label"] for r in picked) == {"pos": 22, "neg": 10}
    indices = [records.index(r) for r in picked]
    assert indices == sorted(indices)  # input order
    assert indices[:10] == [0, 1, 3, 9, 10, 13, 14, 18, 20, 21]
    assert sample_few_shot(records, 32, seed=0, label_key="label") == picked
    assert sample_few_shot(records, 32, seed=1, label_key="label") != picked


def test_stratified_reads_records_and_names_the_line_without_a_label() -> None:
    records = [Record({"text": "a", "label": 1}, "data.jsonl", 1), Record({"text": "b", "label": 0}, "data.jsonl", 2),
               Record({"text": "c"}, "data.jsonl", 4)]
    assert sample_few_shot(records[:2], 2, seed=0, label_key="label") == records[:2]
    with pytest.raises(LoraforgeError, match='data.jsonl:4: has no label field "label"'):
        sample_few_shot(records, 2, seed=0, label_key="label")
    with pytest.raises(LoraforgeError, match="label \"text\" is \\['a'\\]"):
        sample_few_shot([{"text": ["a"]}], 1, seed=0, label_key="text")


def test_stratified_needs_enough_items() -> None:
    with pytest.raises(LoraforgeError, match="asked for 101 examples but the data has only 100"):
        sample_few_shot(labelled(), 101, seed=0, label_key="label")
