"""Which modules LoRA wraps: PEFT's matching rules, per-architecture defaults, and errors that say what exists."""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.lora.config import ALL_LINEAR, LoraConfig
from loraforge.lora.layer import WRAPPABLE, Conv1D
from loraforge.quant.linear import QuantLinear

# PEFT's defaults (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, v0.21.2), by
# model_type; gemma4 (a regex there) is left out.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # Not in peft's table; DistilBERT names its attention projections q_lin/k_lin/v_lin.
    "distilbert": ["q_lin", "v_lin"],
}
_HEAD_NAMES = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES: never wrapped by "all-linear"


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's default targets for this architecture, else "all-linear" (which never takes the output head)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(DEFAULT_TARGET_MODULES.get(model_type, [])) or ALL_LINEAR


def _spec_matches(spec: list[str] | str, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def _in_modules_to_save(path: str, modules_to_save: list[str] | None) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save or [])


def _head_paths(model: nn.Module) -> set[str]:
    heads = {getattr(model, n, None) for n in _HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    heads.add(get_out() if get_out else None)
    return {path for path, module in model.named_modules() if module is not None and module in heads}


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules to wrap, or a LoraforgeError that lists what the model has."""
    spec = config.target_modules if config.target_modules is not None else default_target_modules(model)
    heads = _head_paths(model) if spec == ALL_LINEAR else set()
    found, unwrappable = [], []
    for path, module in model.named_modules():
        if not path or _in_modules_to_save(path, config.modules_to_save):
            continue
        if config.exclude_modules and _spec_matches(config.exclude_modules, path):
            continue
        if spec == ALL_LINEAR:
            if isinstance(module, (nn.Linear, Conv1D, QuantLinear)) and path not in heads:
                found.append(path)
        elif _spec_matches(spec, path):
            (found if isinstance(module, WRAPPABLE) else unwrappable).append(path)
    if unwrappable:
        path = unwrappable[0]
        kind = type(model.get_submodule(path)).__name__
        raise LoraforgeError(
            f"target_modules {spec!r} matches {path} ({kind}), which LoRA cannot wrap: only Linear, Conv1D and "
            f"Embedding layers can be targeted.\n{layer_summary(model)}"
        )
    if not found:
        raise LoraforgeError(
            f"target_modules {spec!r} matches no layer of {type(model).__name__}.\n{layer_summary(model)}"
        )
    return found


def layer_summary(model: nn.Module) -> str:
    """The wrappable layers by short name and type, and the suggested targets: for error messages and inspect."""
    counts: Counter[tuple[str, str]] = Counter()
    for path, module in model.named_modules():
        if isinstance(module, WRAPPABLE):
            counts[(path.rsplit(".", 1)[-1], type(module).__name__)] += 1
    layers = ", ".join(f"{name} ({kind} x{n})" for (name, kind), n in counts.items())
    suggestion = default_target_modules(model)
    shown = ",".join(suggestion) if isinstance(suggestion, list) else suggestion
    return f"Layers it has: {layers}.\nTry: --target-modules {shown}  (or all-linear for every linear layer)"


def check_no_lora(model: nn.Module) -> None:
    """Refuse a model that already holds LoRA layers: a second injection would wrap a wrapper."""
    for path, module in model.named_modules():
        if getattr(module, "is_lora_wrapper", False):
            raise LoraforgeError(
                f"{path} already holds a LoRA layer ({type(module).__name__}): a model takes one injection. Serve "
                "several adapters through one InferenceSession, or merge the first adapter (loraforge merge) and "
                "load the merged model as the base")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the module at `path` was."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
