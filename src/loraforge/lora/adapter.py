"""Adapter files in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`.

Loading is strict (every key present, none extra, every shape equal) and never unpickles anything.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.lora.config import LoraConfig
from loraforge.lora.layer import LoraEmbedding
from loraforge.lora.model import PEFT_PREFIX, LoraModel

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""What an adapter in a store folder (`DIR/<name>/`) may be called: no '/', no leading dot, so none leaves DIR."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
log = logging.getLogger("loraforge")


def is_adapter_name(name: object) -> bool:
    """True when `name` can name an adapter folder (`ADAPTER_NAME`, and no '..' anywhere)."""
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None and ".." not in name


def umask_mode(mode: int = 0o666) -> int:
    """`mode` under this process's umask: what `open` would have given a new file (0o777 for a folder)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def follow_umask(folder: Path) -> None:
    """`folder` and everything in it get the modes a plain write would: transformers and safetensors write through
    private temp files (0600), which a service running as another user (Ollama's, a container's) cannot read."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        path.chmod(umask_mode(0o777 if path.is_dir() else 0o666))


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves a half-written file. The file
    gets the mode a plain write would (mkstemp's 0600 would hide it from a service running as another user)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(lm: LoraModel, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter so that `peft.PeftModel.from_pretrained(base, directory)` loads it (a PiSSA start as the
    ordinary adapter it amounts to: `LoraModel.saved_form`). `state` is `lm.adapter_state_dict()` when the caller
    already took it (under FSDP2 every rank must, one writes)."""
    state = lm.adapter_state_dict() if state is None else state
    return write_adapter(directory, *lm.saved_form(state))


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: LoraConfig) -> Path:
    """adapter_model.safetensors (`tensors`, keys as PEFT saves them) and adapter_config.json into `directory`,
    each file written atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_dict(), indent=2) + "\n"
    atomic_write(out / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def read_adapter_config(directory: str | Path) -> LoraConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise LoraforgeError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraforgeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise LoraforgeError(f"{path}: expected a JSON object of LoRA settings")
    return LoraConfig.from_peft_dict(data, source=str(path))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise LoraforgeError(
                f"{directory / 'adapter_model.bin'} is a pickle file, and loraforge never unpickles files (they can "
                "run code). If you trust it, convert it once: python -c \"import torch; from safetensors.torch "
                "import save_file; save_file(torch.load('adapter_model.bin', weights_only=True), "
                "'adapter_model.safetensors')\""
            )
        raise LoraforgeError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        return load_safetensors(path)
    except (ValueError, OSError) as err:
        raise LoraforgeError(f"{path}: not a readable safetensors file ({err})") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20


_spare: list[torch.Tensor] = []  # the last few files' buffers, reused once no tensor views them (`_buffer`)
_spare_lock = threading.Lock()
SPARE_BUFFERS = 2


def _buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer of `nbytes` for a file's data: one of the last `SPARE_BUFFERS` files' buffers when nothing
    views it any more (an evicted adapter's), else a new one. A reused buffer's pages are already mapped: a cold load
    from a store reads its file without ~8 ms of page faults (bench/RESULTS.md). What nothing views is decided by the
    storage's reference count: a buffer any tensor still shows is never handed out."""
    with _spare_lock:
        for i, buffer in enumerate(_spare):  # not much larger than needed: the cap counts the file's bytes only
            if nbytes <= buffer.numel() <= 2 * nbytes and _unused(buffer):
                _spare.append(_spare.pop(i))  # the most recently used last
                return buffer[:nbytes]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        _spare.append(buffer)
        del _spare[:-SPARE_BUFFERS]
        return buffer[:nbytes]  # a view: the buffer counts as in use from now on


def _use_count(t: torch.Tensor) -> int | None:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


_ALONE = _use_count(torch.empty(1, dtype=torch.uint8))
"""A storage's reference count when one tensor alone holds it (as counted here: this torch's own figure)."""


def _unused(buffer: torch.Tensor) -> bool:
    """True when only `buffer` itself holds its storage: no view of it lives."""
    return _ALONE is not None and _use_count(buffer) == _ALONE


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of ONE buffer, filled by one read: nothing is unpickled, only the JSON
    header is parsed, and every entry is checked (known dtype, offsets inside the data, size = shape x dtype).

    Why not `safetensors.torch.load_file`: it allocates and copies each of an adapter's ~400 tensors (10 ms for an
    r=16 all-linear SmolLM2 adapter here, against 5 ms for one read), and a serving layer that keeps some of them
    (A) and drops others (B, re-scaled) fragments the heap: resident adapters took 1.5x their bytes. Tests check
    this reader against `load_file` on the files safetensors writes (tests/test_multi_adapter.py)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"header is not JSON: {err}") from None
        data = _buffer(size - 8 - n)
        if fh.readinto(memoryview(data.numpy())) != data.numel():
            raise ValueError("the file ended early")
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"entry {key!r} is not {{dtype, shape, data_offsets}} with a known dtype") from None
        itemsize = dtype.itemsize
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data.numel()
                and all(isinstance(d, int) and d >= 0 for d in shape) and end - start == math.prod(shape) * itemsize):
            raise ValueError(f"entry {key!r}: offsets {start}..{end} do not hold a {entry['dtype']} tensor of shape "
                             f"{shape} inside the {data.numel()} data bytes")
        raw = data[start:end]
        tensors[key] = (raw.view(dtype) if start % itemsize == 0 else raw.clone().view(dtype)).view(shape)
    return tensors


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from disk and not yet put into any model: its config and tensors (keys without PEFT's
    `base_model.model.` prefix). Reading and injecting are separate steps, so one file can go into many models
    and a serving session can check a file before it touches its live model."""

    source: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_adapter(directory: str | Path) -> AdapterWeights:
    """Read `directory`'s adapter_config.json and adapter_model.safetensors (never a pickle)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _read_weights(directory).items():
        if not key.startswith(PEFT_PREFIX):
            raise LoraforgeError(f"{directory / ADAPTER_WEIGHTS}: key {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
        tensors[key.removeprefix(PEFT_PREFIX)] = value
    return AdapterWeights(str(directory), config, tensors)


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> LoraModel:
    """Inject the adapter saved in `directory` (by loraforge or PEFT) into `model` and load its weights: the
    training layer (one adapter, mergeable). Serving many adapters: `lora.multi.MultiLoraModel`."""
    directory = Path(directory)
    weights = read_adapter(directory)
    config = weights.config
    try:
        lm = LoraModel(model, config)
    except LoraforgeError as err:
        raise LoraforgeError(f"adapter {directory} does not fit this model (base it was made for: "
                             f"{config.base_model_name_or_path}): {err}") from None
    expected = lm.adapter_parameters()
    loaded = dict(weights.tensors)
    _load_saved_embeddings(lm, loaded, directory)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    where = f"adapter {directory} (made for {config.base_model_name_or_path})"
    if missing:
        raise LoraforgeError(f"{where}: missing key {PEFT_PREFIX}{missing[0]} (shape the model expects: "
                             f"{tuple(expected[missing[0]].shape)}); {len(missing)} missing in all")
    if unexpected:
        raise LoraforgeError(f"{where}: unexpected key {PEFT_PREFIX}{unexpected[0]} (shape "
                             f"{tuple(loaded[unexpected[0]].shape)}) has no place in this model; "
                             f"{len(unexpected)} unexpected in all")
    for key, param in expected.items():
        if loaded[key].shape != param.shape:
            raise LoraforgeError(f"{where}: {PEFT_PREFIX}{key} has shape {tuple(loaded[key].shape)} in the file "
                                 f"but {tuple(param.shape)} in the model: it was made for another base model or rank")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(loaded[key].to(param.dtype))
    lm.set_trainable(trainable)
    return lm


def _load_saved_embeddings(lm: LoraModel, loaded: dict[str, torch.Tensor], directory: Path) -> None:
    # PEFT saves a targeted embedding's full base weight beside its LoRA weights (save_embedding_layers="auto")
    # and loads it back into the base; do the same so its adapters give its numbers.
    for path, layer in lm.layers.items():
        key = f"{path}.base_layer.weight"
        if isinstance(layer, LoraEmbedding) and key in loaded:
            weight = loaded.pop(key)
            if weight.shape != layer.base_layer.weight.shape:
                raise LoraforgeError(f"adapter {directory}: {PEFT_PREFIX}{key} has shape {tuple(weight.shape)}, the "
                                     f"model's is {tuple(layer.base_layer.weight.shape)}")
            with torch.no_grad():
                layer.base_layer.weight.copy_(weight.to(layer.base_layer.weight.dtype))
