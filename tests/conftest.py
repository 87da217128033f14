"""Shared fixtures. Tests never touch the network or the user's own loraforge cache."""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported by any test module
if importlib.util.find_spec("loraforge") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture(scope="session", autouse=True)
def loraforge_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh $LORAFORGE_HOME for the whole session."""
    home = tmp_path_factory.mktemp("loraforge_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def default_model_dir(loraforge_home: Path) -> Path:
    """The default model converted from GGUF into the session cache, once per session (~15 s)."""
    from loraforge.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model tests (use with `pytestmark = usefixtures("one_thread")`):
    tiny models gain nothing from threads, a shared CPU makes OpenMP threads ~100x slower, and one thread makes
    runs bit-exact against each other. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded Llama and its tokenizer saved as a transformers folder (fixtures.tiny_models)."""
    from fixtures.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 5 fixture records (3 text, 2 instruction) as JSONL."""
    from fixtures.tiny_models import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")
