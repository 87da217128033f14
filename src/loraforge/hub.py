"""Hugging Face Hub ids (`owner/name`) resolved to their folder in the local Hugging Face cache.

Nothing here downloads: a model is found only if `huggingface-cli download` (or an earlier transformers run)
already put it in the cache. The cache folder is read from the environment at call time, with the same precedence
as huggingface_hub (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`,
`~/.cache/huggingface/hub`), because `huggingface_hub.constants` freezes those values when it is first imported.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from loraforge.errors import LoraforgeError

_MARKER = "config.json"  # a snapshot is a model folder only if it holds this file


def _hub_cache_dir() -> Path:
    """The hub cache folder that huggingface_hub would use if it were imported now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    legacy = env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(env.get("HF_HUB_CACHE") or legacy)))


def hub_cache_dirs() -> list[Path]:
    """The folders `find_in_hub_cache` searches, in order, for an error message."""
    return [_hub_cache_dir()]


def looks_like_hub_id(name: str) -> bool:
    """True for `owner/name` with exactly one slash and characters the Hub allows, when no such local path exists."""
    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def _newest_snapshot(repo_dir: Path) -> Path | None:
    """The most recently written snapshot of a cached repo that holds a config.json."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    found = [folder for folder in snapshots.iterdir() if (folder / _MARKER).is_file()]
    return max(found, key=lambda folder: folder.stat().st_mtime, default=None)


def find_in_hub_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder (the one holding config.json) of Hub model `repo_id`, or None if it is not cached.

    `revision` is a branch or tag name (resolved through the cache's `refs/`) or a full commit hash. Without one,
    the `main` ref is used, else the newest cached snapshot. Never touches the network.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise LoraforgeError(
            f"'{repo_id}' is not a Hugging Face Hub model id ({error}); write it as owner/name"
        ) from error
    for cache_dir in hub_cache_dirs():
        cached = try_to_load_from_cache(repo_id, _MARKER, cache_dir=cache_dir, revision=revision or "main")
        if isinstance(cached, str):  # the other non-None value is a sentinel: "known not to exist at this revision"
            return Path(cached).parent
        if revision is None:
            newest = _newest_snapshot(cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model"))
            if newest is not None:
                return newest
    return None
