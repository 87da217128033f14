"""loraforge.hub: Hub ids resolved in a fake local Hugging Face cache laid out as huggingface_hub writes it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loraforge.errors import LoraforgeError
from loraforge.hub import find_in_hub_cache, hub_cache_dirs, looks_like_hub_id

OLD = "0" * 39 + "1"  # commit hashes are 40 hex digits
NEW = "0" * 39 + "2"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that every lookup in the test goes to, whatever the machine's own environment says."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def add_snapshot(
    cache: Path, repo_id: str, commit: str, *, refs: tuple[str, ...] = (), files: tuple[str, ...] = ("config.json",)
) -> Path:
    """One cached commit of a model repo: files are blobs, linked from `snapshots/<commit>/`; each ref names it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name in files:
        blob = hashlib.sha256(f"{commit}/{name}".encode()).hexdigest()  # stands for the file's etag
        (repo / "blobs" / blob).write_text("{}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


def test_main_ref_wins_over_newer_snapshot(hub_cache: Path) -> None:
    main = add_snapshot(hub_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", OLD, refs=("main",))
    newer = add_snapshot(hub_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", NEW)
    os.utime(main, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    found = find_in_hub_cache("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert found == hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / OLD
    assert (found / "config.json").read_text() == "{}"


def test_explicit_revision_by_tag_or_commit(hub_cache: Path) -> None:
    old = add_snapshot(hub_cache, "Owner/Name", OLD, refs=("v1",))
    new = add_snapshot(hub_cache, "Owner/Name", NEW, refs=("main",))
    assert find_in_hub_cache("Owner/Name", revision="v1") == old
    assert find_in_hub_cache("Owner/Name", revision=OLD) == old
    assert find_in_hub_cache("Owner/Name", revision="main") == new
    assert find_in_hub_cache("Owner/Name", revision="v2") is None  # no fallback for a revision asked for by name
    assert find_in_hub_cache("Owner/Name", revision="f" * 40) is None


def test_without_main_ref_newest_snapshot_with_config(hub_cache: Path) -> None:
    old = add_snapshot(hub_cache, "Owner/Name", OLD)
    new = add_snapshot(hub_cache, "Owner/Name", NEW, files=("tokenizer.json",))  # newest, but not a model folder
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    assert find_in_hub_cache("Owner/Name") == old


def test_absent_repo_or_config_gives_none(hub_cache: Path) -> None:
    assert find_in_hub_cache("Owner/Missing") is None
    add_snapshot(hub_cache, "Owner/TokenizerOnly", OLD, refs=("main",), files=("tokenizer.json",))
    assert find_in_hub_cache("Owner/TokenizerOnly") is None
    (hub_cache / "models--Owner--Empty").mkdir()  # an interrupted download leaves this
    assert find_in_hub_cache("Owner/Empty") is None


def test_config_cached_as_missing_gives_none(hub_cache: Path) -> None:
    snapshot = add_snapshot(hub_cache, "Owner/Name", OLD, refs=("main",), files=("tokenizer.json",))
    no_exist = snapshot.parents[1] / ".no_exist" / OLD
    no_exist.mkdir(parents=True)
    (no_exist / "config.json").touch()
    assert find_in_hub_cache("Owner/Name") is None


def test_invalid_id_is_a_user_error(hub_cache: Path) -> None:
    with pytest.raises(LoraforgeError, match="'a/b/c' is not a Hugging Face Hub model id"):
        find_in_hub_cache("a/b/c")


def test_hub_cache_dirs_follow_environment_at_call_time(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_cache_dirs() == [hub_cache]
    monkeypatch.setenv("HF_HOME", "/elsewhere/hf")
    assert hub_cache_dirs() == [hub_cache]  # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache_dirs() == [Path("/elsewhere/hf/hub")]
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert hub_cache_dirs() == [Path("/xdg/huggingface/hub")]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("Qwen/Qwen2.5-0.5B", True),
        ("user_1/model.v2", True),
        ("gpt2", False),  # no owner: could be a built-in name or a local folder
        ("a/b/c", False),
        ("/abs/path", False),
        ("owner/", False),
        ("owner/na me", False),
        ("owner/bad--name", False),
        ("owner/name.git", False),
        ("./model", False),
        ("", False),
    ],
)
def test_looks_like_hub_id(name: str, expected: bool) -> None:
    assert looks_like_hub_id(name) is expected


def test_existing_local_path_is_not_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("owner/name") is True
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert looks_like_hub_id("owner/name") is False
