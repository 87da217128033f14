"""Joint multi-task training (`mix`): the mixing probabilities are the closed form (T5/mT5 temperature sampling),
the draw honours them exactly (largest-remainder counts), repeats examples only when a dataset is upsampled, is fixed
by the seed, and a run from a YAML mix of two recipes trains one adapter and reports each dataset's share."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fixtures.tiny_models import tiny_tokenizer
from loraforge.cli import main
from loraforge.config import TrainConfig, build_config, load_yaml
from loraforge.data import draw_mix, load_mix, mix_probabilities
from loraforge.data.mix import allocate
from loraforge.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- probabilities and the draw --------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, temperature, expected", [
    ([1, 1], 1.0, [0.25, 0.75]),              # proportional to size
    ([3, 1], 1.0, [0.5, 0.5]),                # weight 3 on 10 examples weighs as 30
    ([1, 1], 2.0, [1 / (1 + 3 ** 0.5), 3 ** 0.5 / (1 + 3 ** 0.5)]),  # sqrt(10) : sqrt(30)
    ([1, 1], 1e9, [0.5, 0.5]),                # T -> large: uniform
    ([1, 2], 0.5, [100 / (100 + 3600), 3600 / (100 + 3600)]),     # (1·10)^2 : (2·30)^2
])
def test_mixing_probabilities_are_the_closed_form(weights, temperature, expected):
    assert mix_probabilities([10, 30], weights, temperature) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_a_tiny_temperature_does_not_overflow():
    assert mix_probabilities([1000, 3000], [1, 1], 0.001) == pytest.approx([0.0, 1.0])


def test_counts_are_largest_remainder_and_sum_to_the_total():
    assert allocate([1 / 3] * 3, 10) == [4, 3, 3]  # quotas 3.33 each: the one spare goes to the first
    assert allocate([0.25, 0.75], 40) == [10, 30]
    assert allocate(mix_probabilities([7, 13, 29], [1, 1, 1], 1.0), 49) == [7, 13, 29]  # float error absorbed
    p = mix_probabilities([10, 30], [1, 1], 2.0)  # 0.36603, 0.63397 of 40: quotas 14.64, 25.36
    assert allocate(p, 40) == [round(p[0] * 40), round(p[1] * 40)] == [15, 25]


def _datasets(*sizes: int) -> list[list[tuple[int, int]]]:
    return [[(i, k) for k in range(n)] for i, n in enumerate(sizes)]


@pytest.mark.parametrize("weights, temperature", [([1, 1], 2.0), ([1, 1], 1e9), ([3, 1], 1.0), ([1, 4], 0.5)])
def test_the_realized_counts_are_the_rounded_shares(weights, temperature):
    datasets = _datasets(10, 30)
    mixed, counts = draw_mix(datasets, weights, temperature, seed=0)
    p = mix_probabilities([10, 30], weights, temperature)
    assert len(mixed) == 40  # an epoch is as long as plain concatenation
    realized = Counter(i for i, _ in mixed)
    assert [realized[0], realized[1]] == counts == [round(p[0] * 40), round(p[1] * 40)]


def test_upsampling_only_where_a_share_exceeds_the_dataset():
    datasets = _datasets(10, 30)
    mixed, counts = draw_mix(datasets, [1, 1], 2.0, seed=0)  # 15 from the 10, 25 from the 30
    assert counts == [15, 25]
    small = Counter(k for i, k in mixed if i == 0)
    assert sorted(small) == list(range(10)) and sorted(small.values()) == [1] * 5 + [2] * 5  # each once, 5 twice
    large = Counter(k for i, k in mixed if i == 1)
    assert len(large) == 25 and set(large.values()) == {1}  # downsampled: without replacement

    mixed, counts = draw_mix(datasets, [1, 1], 1.0, seed=3)  # proportional: every example once
    assert counts == [10, 30] and sorted(mixed) == sorted(datasets[0] + datasets[1])

    mixed, counts = draw_mix(_datasets(4, 6), [3, 1], 1.0, seed=0)  # 12 : 6 of 10 -> 7 (4 + 3 repeats) and 3
    assert counts == [7, 3]
    assert sorted(Counter(k for i, k in mixed if i == 0).values()) == [1, 2, 2, 2]
    assert len({k for i, k in mixed if i == 1}) == 3


def test_the_seed_fixes_the_list():
    datasets = _datasets(10, 30)
    first, _ = draw_mix(datasets, [1, 1], 2.0, seed=0)
    assert draw_mix(datasets, [1, 1], 2.0, seed=0)[0] == first
    other, counts = draw_mix(datasets, [1, 1], 2.0, seed=1)
    assert other != first and counts == [15, 25]  # another order (and other picks), the same counts
    plain, _ = draw_mix(datasets, [1, 1], 1.0, seed=0)
    assert plain != sorted(plain)  # shuffled, so batches mix the tasks


# ---- loading: each dataset with its own recipe -------------------------------------------------------------------
def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def two_tasks(tmp_path: Path) -> tuple[Path, Path]:
    """6 E2E records (mr/ref) and 4 question/answer records for text2text, words of the tiny vocabulary."""
    places, foods = ("river pub", "coffee shop"), ("english", "italian", "cheap")
    e2e = _write(tmp_path / "e2e.jsonl", [{"mr": f"name {n} food {f}", "ref": f"the {n} is {f} food"}
                                          for n in places for f in foods])
    qa = _write(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in [
        ("the coffee shop is near", "the river"), ("the pub is in", "the city centre"),
        ("the restaurant is", "family friendly"), ("the food is", "cheap")]])
    return e2e, qa


def _mix(e2e: Path, qa: Path, **extra) -> list[dict]:
    return [{"data": str(e2e), "recipe": "e2e"},
            {"data": str(qa), "recipe": "text2text", "columns": "input=question,output=answer", "weight": 2, **extra}]


def test_each_dataset_is_read_with_its_recipe_and_validation_is_held_out_per_dataset(two_tasks):
    e2e, qa = two_tasks
    tok = tiny_tokenizer()
    cfg = TrainConfig(mix=_mix(e2e, qa))
    train, val, stats = load_mix(cfg.mix, tok, 64, seed=0)
    assert [(p.name, p.examples, p.drawn) for p in stats.parts] == [("e2e", 6, 4), ("qa", 4, 6)]
    assert stats.mix_line() == "mix: e2e 4 (40%), qa 6 (60%) (upsampled)"
    assert (stats.records_read, stats.used) == (10, 10) and val == []
    assert stats.formats == {"recipe:e2e": 6, "recipe:text2text": 4}
    texts = [tok.decode(e.input_ids) for e in train]
    assert sum(t.startswith("<s> name ") for t in texts) == 4  # e2e's prompt: its meaning representation
    assert sum("the coffee shop is near" in t or "the pub is in" in t or "the restaurant is" in t
               or "the food is" in t for t in texts) == 6

    train, val, stats = load_mix(cfg.mix, tok, 64, seed=0, val_split=0.5)  # 3 of e2e and 2 of qa held out
    assert len(val) == 5 and [p.examples for p in stats.parts] == [3, 2] and len(train) == 5
    assert not {tuple(e.input_ids) for e in val} & {tuple(e.input_ids) for e in train}

    cfg = TrainConfig(mix=_mix(e2e, qa, val_data=str(qa)))  # qa's own validation file; e2e has none
    train, val, stats = load_mix(cfg.mix, tok, 64, seed=0, val_split=0.5)
    assert len(val) == 3 + 4 and [p.examples for p in stats.parts] == [3, 4]


# ---- the run, from YAML ---------------------------------------------------------------------------------------------
RUN = dict(max_steps=2, batch_size=2, r=2, lora_alpha=4, lora_dropout=0.0, lr=1e-2, seed=0, max_length=64,
           threads=1, target_modules="q_proj,v_proj", dtype="float32")


def _config(path: Path, **options) -> Path:
    path.write_text(yaml.safe_dump({**RUN, **options}, sort_keys=False), encoding="utf-8")
    return path


def test_a_yaml_mix_trains_one_adapter_and_reports_each_share(llama_dir, two_tasks, tmp_path, caplog):
    e2e, qa = two_tasks
    out = tmp_path / "run"
    config = _config(tmp_path / "mix.yaml", model=str(llama_dir), output=str(out), mix=_mix(e2e, qa))
    with caplog.at_level(logging.INFO, logger="loraforge"):
        assert main(["train", str(config), "-q"]) == 0
    assert "mix: e2e 4 (40%), qa 6 (60%) (upsampled)" in caplog.text

    saved = yaml.safe_load((out / loop.CONFIG_FILE).read_text(encoding="utf-8"))
    assert saved["data"] is None and saved["mix_temperature"] == 1.0
    assert [(m["data"], m["recipe"], m["columns"], m["weight"]) for m in saved["mix"]] == [
        (str(e2e), "e2e", None, 1.0), (str(qa), "text2text", {"input": "question", "output": "answer"}, 2.0)]
    resumed = build_config(TrainConfig, load_yaml(out / loop.CONFIG_FILE), "train_config.yaml")  # as --resume reads
    assert resumed.mix == build_config(TrainConfig, load_yaml(config), "mix.yaml").mix

    summary = json.loads((out / loop.SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["steps"] == 2 and summary["data"] == {"records_read": 10, "used": 10, "skipped": 0,
                                                         "truncated": 0}
    assert [(d["name"], d["examples"], d["probability"], d["drawn"], d["percent"], d["upsampled"])
            for d in summary["mix"]["datasets"]] == [("e2e", 6, round(3 / 7, 6), 4, 40.0, False),
                                                     ("qa", 4, round(4 / 7, 6), 6, 60.0, True)]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.append("qa.jsonl"), "mix[2] must be a mapping"),
    (lambda m: m[1].update(colums="input=question"), "mix[1]: unknown option(s) ['colums']. Known options: data, "),
    (lambda m: m[1].update(weight=-1), "mix[1]: weight must be a positive number, got -1"),
    (lambda m: m[1].update(columns="input=question,answer=answer"), 'mix[1]: columns: the text2text recipe has no '
                                                                    'field "answer"'),
    (lambda m: m[0].update(metric="nope"), "mix[0]: --metric 'nope': choose one of"),
    (lambda m: m[1].pop("data"), "mix[1] needs data"),
    (lambda m: m[1].update(data="missing.jsonl"), "missing.jsonl"),  # every file is read before the model loads
], ids=["not_a_mapping", "unknown_key", "weight", "column", "metric", "no_data", "missing_file"])
def test_mix_mistakes_exit_2_naming_the_entry(change, message, llama_dir, two_tasks, tmp_path, capsys):
    mix = _mix(*two_tasks)
    change(mix)
    config = _config(tmp_path / "bad.yaml", model=str(llama_dir), output=str(tmp_path / "o"), mix=mix)
    assert main(["train", str(config)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, message", [
    ({"data": "x.jsonl"}, "give the training data as 'data' or as 'mix'"),
    ({"mix_temperature": 0}, "option 'mix_temperature' must be a positive number, got 0"),
    ({"task": "seq-cls"}, "option 'mix' trains one causal-lm adapter"),
    ({"per_user": "user"}, "option 'mix' trains one causal-lm adapter"),
    ({"recipe": "e2e"}, "with 'mix', give recipe in each mix entry"),
])
def test_mix_with_options_it_replaces_is_refused(options, message, llama_dir, two_tasks, tmp_path, capsys):
    config = _config(tmp_path / "bad.yaml", model=str(llama_dir), output=str(tmp_path / "o"), mix=_mix(*two_tasks),
                     **options)
    assert main(["train", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_mix_as_a_flag_says_to_use_the_yaml(llama_dir, tmp_path, capsys):
    assert main(["train", "--model", str(llama_dir), "--mix", "a.jsonl", "--output", str(tmp_path / "o")]) == 2
    assert "set it in the YAML config" in capsys.readouterr().err
