"""The example configs in examples/: each one parses, names data that exists and reads, and trains (2 steps).

The configs name their data relative to the repo root (`../shared/data/...`, and `runs/data/...` for the files that
`examples/prepare_data.py` derives), so every test here runs from the repo root. The prepared files are written
into a temporary folder, never into the checkout, and the integration runs point `--data` at them.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.config import TrainConfig, build_config, load_yaml
from loraforge.data import detect_format, get_recipe, read_records, to_example
from loraforge.data.encode import HeadSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED = ROOT.parent / "shared" / "data"
PREPARED = "runs/data/"  # where prepare_data.py writes by default, as the configs name it
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
IDS = [p.stem for p in CONFIGS]


@functools.cache
def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_data", EXAMPLES / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `python examples/prepare_data.py` writes to runs/data/, written to a temporary folder instead."""
    out = tmp_path_factory.mktemp("prepared")
    _prepare_module().prepare(SHARED, out)
    return out


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _config(path: Path) -> TrainConfig:
    return build_config(TrainConfig, load_yaml(path), source=str(path))


def _resolve(path: str, prepared: Path) -> Path:
    return prepared / path.removeprefix(PREPARED) if path.startswith(PREPARED) else ROOT / path


def test_there_are_examples() -> None:
    assert len(CONFIGS) >= 13, [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_example_is_a_valid_config_that_says_how_to_run_it(path: Path) -> None:
    cfg = _config(path)
    header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    assert f"loraforge train examples/{path.name}" in header
    assert "Measured" in header
    assert cfg.data and cfg.output == f"runs/{path.stem}"
    assert cfg.max_steps > 0 and cfg.epochs >= 0  # its length: steps, or passes over the data
    if cfg.task == "causal-lm":  # auto: bf16 where the CPU runs it natively (as measured), else fp32 (emulated bf16
        assert cfg.dtype == "auto" and cfg.packing  # matmuls run ~100x slower than fp32 on an AVX2-only CPU)
    else:  # encoder heads are never packed and learn badly in bfloat16
        assert cfg.dtype == "float32" and cfg.model == "minilm-l6"
    assert (cfg.val_data or cfg.val_split) and cfg.eval_every > 0, "every example validates as it trains"


def test_prepare_data_writes_what_it_lists(prepared: Path) -> None:
    assert all((prepared / name).exists() for name in _prepare_module().OUTPUTS)


def test_prepared_pubmedqa_leaves_out_the_official_test_pmids(prepared: Path) -> None:
    test = json.loads((SHARED / "pubmedqa/test_ground_truth.json").read_text(encoding="utf-8"))
    ids = {r.fields["id"] for name in ("train", "dev") for r in read_records(prepared / f"pubmedqa/{name}.json")}
    assert len(ids) == 500 and not ids & set(test)


def test_prepared_cuad_holds_whole_contracts_out(prepared: Path) -> None:
    train = {p.name for p in (prepared / "legal_cuad/train").iterdir()}
    heldout = {p.name for p in (prepared / "legal_cuad/heldout").iterdir()}
    assert heldout and not train & heldout and len(train | heldout) == 101


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_example_data_exists_and_its_first_record_makes_an_example(path: Path, prepared: Path) -> None:
    cfg = _config(path)
    for name in ("data", "val_data"):
        given = getattr(cfg, name)
        if not given:
            continue
        if given.startswith(PREPARED):
            assert given.removeprefix(PREPARED) in _prepare_module().OUTPUTS, f"prepare_data.py does not write {given}"
        data = _resolve(given, prepared)
        assert data.exists(), f"{path.name}: {name} {given} does not exist"
        record = next(iter(read_records(data, cfg.file_format)))
        if cfg.task != "causal-lm":  # an encoder head reads the record by task (and recipe)
            spec = HeadSpec.from_records(cfg.task, [record], labels=cfg.labels, recipe=cfg.recipe, columns=cfg.columns)
            assert spec.labels
        elif cfg.recipe:  # the recipe finds its fields (with the config's column names) in the real record
            recipe = get_recipe(cfg.recipe).with_columns(cfg.columns)
            assert "".join(recipe.to_example(record).learned_text).strip()
        else:
            fmt = cfg.data_format or detect_format(record, cfg.columns)
            assert "".join(to_example(record, fmt, columns=cfg.columns).learned_text).strip()


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert all(f"examples/{p.name}" in readme for p in CONFIGS)


# --- every example trains for 2 steps, on the real models ---------------------------------------------------------

@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the runs are tiny and the CPU is shared; restored afterwards for the other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.integration
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_example_trains_two_steps(path: Path, prepared: Path, default_model_dir: Path, at_root: None,
                                  one_thread: None, tmp_path: Path) -> None:
    from loraforge.cli import main

    cfg = _config(path)
    argv = ["-q", "train", str(path.relative_to(ROOT)), "--max-steps", "2", "--epochs", "0",
            "--output", str(tmp_path / "run"),
            "--batch-size", "1", "--max-examples", "8",
            "--val-data", "", "--val-split", "0", "--eval-every", "0"]  # no validation: it costs minutes
    if cfg.data.startswith(PREPARED):
        argv += ["--data", str(_resolve(cfg.data, prepared))]
    assert main(argv) == 0
    assert (tmp_path / "run/adapter_model.safetensors").is_file()
    assert (tmp_path / "run/adapter_config.json").is_file()
    summary = json.loads((tmp_path / "run/train_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2 and summary["best_val_loss"] is None
    if cfg.task != "causal-lm":
        assert (tmp_path / "run/labels.json").is_file()
