"""The LoRA config: PEFT's field names and meanings, validated on creation.

`adapter_config.json` is PEFT's `LoraConfig` serialised; `LoraConfig.to_peft_dict()` writes it and
`LoraConfig.from_peft_dict()` reads it, so an adapter moves between loraforge and PEFT with no mapping table.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from loraforge.errors import LoraforgeError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT fields we do not implement. Reading an adapter_config.json is fine while they hold their "off" value;
# any other value would change the adapter's meaning, so we refuse it instead of ignoring it.
_PEFT_FIELDS_OFF = {
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, []),
    "megatron_config": (None,),
    "loftq_config": (None, {}),
    "eva_config": (None,),
    "corda_config": (None,),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
}
# PEFT bookkeeping fields with no effect on the adapter's numbers.
_PEFT_FIELDS_IGNORED = {
    "peft_type", "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config", "velora_config",
}


@dataclass
class LoraConfig:
    """Where LoRA goes and how it is shaped. Field names and defaults are PEFT's."""

    r: int = 8
    """Rank of the update B·A."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input, during training only."""
    target_modules: list[str] | str | None = None
    """Module name suffixes (`["q_proj", "v_proj"]`), a regex matched against the full module path, or
    "all-linear" (every Linear/Conv1D except the output head). None means the architecture's default."""
    exclude_modules: list[str] | str | None = None
    """Same matching rules as target_modules; a match here is never wrapped."""
    bias: str = "none"
    """Which biases train: "none", "all", or "lora_only" (those of wrapped layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: a learned per-output magnitude on the normalised updated weight."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero. "gaussian": A normal(std=1/r), B zero. "pissa": A and B the top-r singular
    part of the base weight, which keeps the rest (saved as an ordinary rank-2r adapter). False: both random."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched at the end of the module path: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module lora_alpha overrides, matched like rank_pattern."""
    fan_in_fan_out: bool = False
    """True when the wrapped layer stores its weight as (in, out); set automatically for GPT-2's Conv1D."""
    task_type: str | None = None
    """PEFT task type recorded in the adapter (CAUSAL_LM, SEQ_CLS, TOKEN_CLS, ...)."""
    base_model_name_or_path: str | None = None
    """The base the adapter was trained on; `loraforge merge` uses it when --model is not given."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraforgeError(f"LoRA field 'r' must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise LoraforgeError(f"LoRA field 'lora_alpha' must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraforgeError(f"LoRA field 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise LoraforgeError(f"LoRA field 'bias' must be one of {BIAS_MODES}, got {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() in ("gaussian", "pissa"))):
            raise LoraforgeError(
                f"LoRA field 'init_lora_weights' must be true, false, \"gaussian\" or \"pissa\", got {init!r}"
            )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise LoraforgeError(f"LoRA field 'task_type' must be one of {TASK_TYPES}, got {self.task_type!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif isinstance(value, str) and value != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as err:
                    raise LoraforgeError(f"LoRA field '{name}' is not a valid regex ({err}): {value!r}") from None
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise LoraforgeError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")

    def check_on_original_base(self, where: str) -> None:
        """Refuse an adapter whose layers only make sense on a moved base: a PiSSA adapter saved as trained (PEFT's
        save_pretrained without the weight conversion) adds to W minus its start, not to W."""
        if str(self.init_lora_weights).lower() == "pissa":
            raise LoraforgeError(f"{where} is a PiSSA adapter saved as trained: it applies to the base minus its "
                                 "PiSSA start, not to the base itself. Save it converted (loraforge does; in PEFT: "
                                 "save_pretrained(..., path_initial_model_for_weight_conversion=...)), or load it "
                                 "with loraforge.lora.load_adapter, which re-derives that base")

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The (r, lora_alpha) of one module: its rank_pattern/alpha_pattern entry, else the global values."""
        return (_pattern_value(self.rank_pattern, module_path, self.r),
                _pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, readable by `peft.PeftConfig.from_pretrained`."""
        out = dataclasses.asdict(self)
        out.update({name: off[0] for name, off in _PEFT_FIELDS_OFF.items()})
        out["peft_type"] = "LORA"
        out["inference_mode"] = True
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read a PEFT adapter_config.json dict; refuse PEFT features that loraforge does not implement."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraforgeError(f"{source}: peft_type is {data.get('peft_type')!r}; loraforge loads LoRA adapters only")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_FIELDS_OFF:
                if value not in _PEFT_FIELDS_OFF[key]:
                    raise LoraforgeError(
                        f"{source}: field {key!r} = {value!r} is a PEFT feature loraforge does not support; "
                        "train the adapter without it"
                    )
            elif key not in _PEFT_FIELDS_IGNORED and value not in (None, False, {}, []):
                raise LoraforgeError(
                    f"{source}: unknown field {key!r} = {value!r}. Known fields: {', '.join(sorted(known))}"
                )
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build from user options (YAML or Python); unknown keys are rejected with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraforgeError(f"{source}: unknown LoRA option(s) {unknown}. Known: {', '.join(sorted(known))}")
        return cls(**data)


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches the end of the path wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default
