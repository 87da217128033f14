"""A folder of per-user adapters, `DIR/<name>/` in PEFT's format, loaded into a live session on first use.

Names are checked against `lora.adapter.ADAPTER_NAME`, so a name can never reach outside the folder (no `/`, no `..`, no leading
dot). Resident adapters form an LRU set bounded by a memory cap and/or a count: using an adapter that is not
resident reads it from disk (`lora.read_adapter`, safetensors only) and evicts the least recently used adapters
that no request holds until it fits. A file that does not fit the base is refused with the reason, and the live
model is left as it was. The cap counts resident adapters. Serving batches that mix 5 or more of them also holds a
copy of adapters interleaved for the lane kernel, as many as the largest such mix needed, rounded up to 8
(`MultiLoraModel.lane_bytes`, lora/multi.py): not counted by the cap.

A server replaces an adapter while requests are decoding on it (`replace`): the new weights go into the session under
a new resident name (`alice@2`; `@` is never part of an adapter name), new requests get it (`current`), and
requests already in flight keep the old weights until they finish and `collect` drops them.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.infer.session import InferenceSession
from loraforge.lora.adapter import ADAPTER_CONFIG, is_adapter_name, read_adapter

log = logging.getLogger("loraforge")


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else a LoraforgeError saying what names may be."""
    if not is_adapter_name(name):
        raise LoraforgeError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (no '/' and no '..')")
    return name


class StoreFull(LoraforgeError):
    """Every resident adapter is in use and the cap leaves no room for another: retry when a request finishes."""


class AdapterStore:
    """Adapters on disk under `root`, made resident in `session` on demand, least recently used evicted first."""

    def __init__(self, root: str | Path, session: InferenceSession, *, max_resident_mb: float = 0,
                 max_resident: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LoraforgeError(f"adapter store {self.root} is not a folder; create it, or train into it with "
                                 "loraforge train --per-user FIELD --output DIR")
        if max_resident_mb < 0 or max_resident < 0:
            raise LoraforgeError("max_resident_mb and max_resident must be 0 (no cap) or more")
        self.session = session
        self.cap_bytes = int(max_resident_mb * 2**20)
        self.cap_count = max_resident
        self.resident: OrderedDict[str, int] = OrderedDict()  # resident name -> bytes, least recently used first
        self.current: dict[str, str] = {}  # adapter name -> the resident name new requests use (name, or name@N)
        self._versions: dict[str, int] = {}
        self.load_seconds: list[float] = []  # one entry per cold load, for /metrics and the benchmark

    def names(self) -> list[str]:
        """Every adapter on disk (a valid name whose folder has adapter_config.json), sorted."""
        return sorted(p.name for p in self.root.iterdir()
                      if is_adapter_name(p.name) and (p / ADAPTER_CONFIG).is_file())

    def path(self, name: str) -> Path:
        folder = self.root / check_name(name)
        if not (folder / ADAPTER_CONFIG).is_file():
            raise LoraforgeError(f"no adapter named {name!r} in {self.root} (no {folder / ADAPTER_CONFIG})")
        return folder

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    def ensure(self, names: Iterable[str | None], *, pinned: Iterable[str] = ()) -> list[str | None]:
        """Make every adapter in `names` resident (None is the base); their resident names, in order. Evicts only
        adapters that are neither in `names` nor in `pinned` (the resident names in-flight requests use)."""
        names = list(names)
        keep = set(pinned) | {self.current[n] for n in names if n in self.current}
        for name in dict.fromkeys(n for n in names if n is not None):
            if name in self.current:
                self.resident.move_to_end(self.current[name])
            else:
                self.current[name] = self._load(name, name, keep)
                keep.add(name)
        return [None if n is None else self.current[n] for n in names]

    def replace(self, name: str, *, pinned: Iterable[str] = ()) -> str:
        """Read adapter `name` from disk again (its files were replaced); its new resident name. When no request in
        `pinned` uses the old weights they are replaced in place; otherwise the new ones load beside them."""
        old, pinned = self.current.get(name), set(pinned)
        if old is not None and old in pinned:  # in flight: the new weights go under a new resident name
            self._versions[name] = self._versions.get(name, 1) + 1
            resident = f"{name}@{self._versions[name]}"
            self.current[name] = self._load(name, resident, pinned | {resident})
            return resident
        if old is None:
            self.current[name] = self._load(name, name, pinned | {name})
            return name
        nbytes = self.resident.pop(old)  # replaced in place: its bytes are counted again by _load
        try:
            self._load(name, old, pinned | {old})
        except LoraforgeError:
            self.resident[old] = nbytes  # refused before anything changed: the old weights still serve
            raise
        return old

    def unload(self, name: str, *, pinned: Iterable[str] = ()) -> None:
        """Drop adapter `name` from memory (it stays on disk and loads again on its next use). Weights that
        in-flight requests use stay until they finish (`collect`)."""
        if name not in self.current:
            raise LoraforgeError(f"adapter {name!r} is not resident; resident: {', '.join(self.current) or 'none'}")
        del self.current[name]
        self.collect(pinned)

    def collect(self, pinned: Iterable[str] = ()) -> None:
        """Free the weights that no adapter name points to any more (replaced or unloaded) and no request uses."""
        pinned, live = set(pinned), set(self.current.values())
        for resident in [r for r in self.resident if r not in live and r not in pinned]:
            self.session.remove_adapter(resident)
            del self.resident[resident]

    def _load(self, name: str, resident: str, keep: set[str]) -> str:
        start = time.perf_counter()
        weights = read_adapter(self.path(name))
        incoming = self.session.lora.bytes_needed(weights)
        if self.cap_bytes and incoming > self.cap_bytes:
            raise LoraforgeError(f"adapter {name} needs {incoming / 2**20:.1f} MiB, more than the whole resident cap "
                                 f"of {self.cap_bytes / 2**20:.1f} MiB; raise --max-resident-mb")
        while self._over(incoming, 1):
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                raise StoreFull(f"cannot make room for adapter {name}: every resident adapter is in use; raise "
                                "--max-resident-mb / the resident count, or send fewer adapters at once")
            self.evict(victim)
        info = self.session.add_adapter(resident, weights)
        self.resident[resident] = info.nbytes
        self.load_seconds.append(time.perf_counter() - start)
        log.debug("loaded adapter %s (%.1f MiB) in %.1f ms", name, info.nbytes / 2**20, 1e3 * self.load_seconds[-1])
        return resident

    def _over(self, incoming: int, count: int) -> bool:
        return bool((self.cap_bytes and self.resident_bytes + incoming > self.cap_bytes)
                    or (self.cap_count and len(self.resident) + count > self.cap_count))

    def evict(self, resident: str) -> None:
        """Take resident weights out of memory (the least recently used, when the cap needs room)."""
        self.session.remove_adapter(resident)
        del self.resident[resident]
        for name in [n for n, r in self.current.items() if r == resident]:
            del self.current[name]
