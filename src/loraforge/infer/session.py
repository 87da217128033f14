"""The one way loraforge loads a model for inference: a base on one device and dtype, plus any number of named
adapters served together (`lora.multi`).

    session = InferenceSession.open("smollm2-135m-instruct", adapters={"alice": "runs/alice", "bob": "runs/bob"})
    session.route(["alice", None, "bob"])   # row 0 on alice, row 1 on the base, row 2 on bob: one forward
    with session.use("alice"):               # every row on alice (beam search, perplexity, a head's predictions)
        ...

Reading an adapter (`lora.read_adapter`) and putting it into the live model (`add_adapter`) are separate steps;
adding, replacing or removing one never touches the others. Generation runs through `infer.engine.Engine`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.config import DEFAULT_MODEL, adapter_quantize, resolve_dtype
from loraforge.data.chat import read_system_prompt
from loraforge.data.encode import LABELS_FILE, PEFT_TASK_TYPES, HeadSpec
from loraforge.errors import LoraforgeError
from loraforge.lora.adapter import AdapterWeights, read_adapter
from loraforge.lora.multi import MultiLoraModel
from loraforge.quant.loftq import MOVED_BASE, apply_moved_base, has_moved_base
from loraforge.models import (adapter_base, architecture_kind, load_encoder_with_head, load_model, require_encoder,
                              resolve_model)

log = logging.getLogger("loraforge")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class AdapterInfo:
    """What the session knows of a resident adapter besides its weights."""

    name: str
    source: str
    base: str | None
    nbytes: int
    head: HeadSpec | None = None
    system: str | None = None


def resolve_device(name: str = "cpu") -> torch.device:
    """`auto`: the first CUDA GPU when there is one, else the CPU; `cpu`; `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name.startswith("cuda"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LoraforgeError(f"--device {name}: this machine has no CUDA GPU that torch can use; use cpu or auto")
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise LoraforgeError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")


class InferenceSession:
    """A frozen base model, its tokenizer, a device and a dtype, and the named adapters resident on it."""

    def __init__(self, model, tokenizer, *, base: str, kind: str = "causal-lm", device: str = "cpu",
                 head: HeadSpec | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.base = base
        self.kind = kind
        self.head = head
        self.lora = MultiLoraModel(self.model, self.device, wrap_all=kind == "causal-lm")
        self.adapters: dict[str, AdapterInfo] = {}
        self.moved_base: str | None = None  # the adapter whose LoftQ base this session's base is (`open`)

    @classmethod
    def open(cls, model: str | None = None, adapters: Mapping[str, str | Path] | Sequence[str | Path] = (), *,
             dtype: str = "float32", device: str = "cpu", quantize: str | None = None) -> InferenceSession:
        """Load the base (`model`, else the adapters' own base, else the default) and add `adapters`: a mapping of
        names to folders, or folders named by their last path part. Adapters with labels.json are encoder heads.
        `quantize`: the base packed (`quant.METHODS`); None: as the adapters were trained (`adapter_quantize`)."""
        named = dict(adapters) if isinstance(adapters, Mapping) else _name_folders(adapters)
        quantize = quantize or adapter_quantize(list(named.values()))
        if model is None:
            bases = {str(resolve_model(b).resolve()): b for b in map(adapter_base, named.values()) if b}  # by folder
            if len(bases) > 1:
                raise LoraforgeError(f"the adapters were made for different bases ({', '.join(bases.values())}); give "
                                     "--model to serve them on one, or run them separately")
            model = next(iter(bases.values()), DEFAULT_MODEL)
        heads = {name: HeadSpec.load(folder) for name, folder in named.items() if (Path(folder) / LABELS_FILE).is_file()}
        if heads:
            if len(heads) != len(named):
                raise LoraforgeError(f"adapters {', '.join(heads)} are classifier heads and "
                                     f"{', '.join(set(named) - set(heads))} are not: serve them separately")
            first = next(iter(heads.values()))
            if any(h.task != first.task or h.labels != first.labels for h in heads.values()):
                raise LoraforgeError("the head adapters differ in task or labels (labels.json); one session serves "
                                     "heads of one task and label set")
            require_encoder(model, first.task)
            base_model, tokenizer = load_encoder_with_head(model, first.task, len(first.labels),
                                                           resolve_dtype(dtype, resolve_device(device)), quantize)
            session = cls(base_model, tokenizer, base=model, kind=first.task, device=device, head=first)
        else:
            kind = architecture_kind(model)
            if kind != "decoder":
                raise LoraforgeError(f"'{model}' is an {kind}: it cannot generate text. Give an adapter trained with "
                                     "--task seq-cls|token-cls (it has labels.json), or a decoder model")
            base_model, tokenizer = load_model(model, dtype=resolve_dtype(dtype, resolve_device(device)),
                                               quantize=quantize)
            moved = [folder for folder in named.values() if has_moved_base(folder)]
            if moved and len(named) > 1:
                raise LoraforgeError(f"adapter {moved[0]} was trained with LoftQ on a base of its own "
                                     f"({MOVED_BASE}), which would be every row's base: serve it alone")
            if moved:
                apply_moved_base(base_model, moved[0])
            session = cls(base_model, tokenizer, base=model, device=device)
            session.moved_base = str(Path(moved[0]).resolve()) if moved else None
        for name, folder in named.items():
            session.add_adapter(name, folder)
        return session

    # ---- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, source: str | Path | AdapterWeights) -> AdapterInfo:
        """Read (if given a folder) and put an adapter in the live model under `name`, replacing one of that name.
        A file that does not fit the base is refused before anything changes."""
        weights = source if isinstance(source, AdapterWeights) else read_adapter(source)
        folder = Path(weights.source)
        if has_moved_base(folder) and str(folder.resolve()) != self.moved_base:
            raise LoraforgeError(f"adapter {folder} was trained with LoftQ on a base of its own ({MOVED_BASE}); it runs "
                                 "only in a session opened for it alone (loraforge generate/eval --adapter "
                                 f"{folder}), not beside other adapters")
        head = HeadSpec.load(folder) if (folder / LABELS_FILE).is_file() else None
        if (head is None) != (self.head is None) or (head and self.head and head.labels != self.head.labels):
            raise LoraforgeError(f"adapter {weights.source} does not fit this session: "
                                 + (f"it is a {head.task} head with labels {list(head.labels)}" if head else
                                    "it has no classifier head") + f", the session serves {self._serves()}")
        if head and weights.config.task_type != PEFT_TASK_TYPES[head.task]:
            raise LoraforgeError(f"adapter {folder}: task_type is {weights.config.task_type} in adapter_config.json, "
                                 f"but its {LABELS_FILE} says {head.task}; the two files come from different runs")
        self.lora.add(name, weights)
        info = AdapterInfo(name, weights.source, weights.config.base_model_name_or_path,
                           self.lora.adapter_bytes(name), head, read_system_prompt(folder))
        self.adapters[name] = info
        return info

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise LoraforgeError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")
        self.lora.remove(name)
        del self.adapters[name]

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise LoraforgeError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")

    def _serves(self) -> str:
        return f"{self.head.task} heads with labels {list(self.head.labels)}" if self.head else "a decoder (no head)"

    # ---- which adapter each row uses ----------------------------------------------------------------------------
    def route(self, names: Sequence[str | None] | None) -> None:
        """Row i of the following forwards uses adapter `names[i]` (None: the base alone)."""
        if names is not None:
            for name in set(names):
                self.check_adapter(name)
        self.lora.route(None if names is None else list(names))

    @contextmanager
    def use(self, name: str | None) -> Iterator[Any]:
        """Every row, whatever the batch size, on adapter `name` (None: the base) inside the block; yields the model."""
        self.check_adapter(name)
        self.lora.route([name])
        try:
            yield self.model
        finally:
            self.lora.route(None)

    def system_prompt(self, name: str | None) -> str | None:
        """The system prompt adapter `name` was trained with (None when its chats had none, or several)."""
        return self.adapters[name].system if name is not None else None


def _name_folders(folders: Sequence[str | Path]) -> dict[str, Path]:
    """Folders named by their last path part ("runs/alice" -> "alice"); a repeated name gets a ' mark."""
    named: dict[str, Path] = {}
    for folder in folders:
        name = Path(folder).resolve().name or str(folder)
        while name in named:
            name += "'"
        named[name] = Path(folder)
    return named
