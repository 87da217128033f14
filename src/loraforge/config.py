"""The training options: one typed dataclass, reachable from YAML, CLI flags and Python alike.

Each field carries its help text in `metadata["help"]`; the CLI builds its flags from these fields, so a new option
is documented once, here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from loraforge.errors import LoraforgeError
from loraforge.quant.linear import METHODS as QUANTIZE_METHODS

DEFAULT_MODEL = "smollm2-135m-instruct"
METRICS_FILE = "metrics.jsonl"
"""Per-step training metrics in a run folder, one JSON object per line (train writes it, eval plots it)."""
TRAIN_CONFIG_FILE = "train_config.yaml"  # the resolved config a run writes into its output folder
METRIC_HELP = "text recipes: score generated answers with exact_match, token_f1, rouge_l, bleu or chrf instead of " \
              "the recipe's metric (text2text's: token_f1)"
INSTRUCTION_HELP = "the instruction atop every prompt, instead of the recipe's own"
ANSWERS = ("generate", "label-words")
ANSWER_HELP = ("generate: the model writes its answer, parsed by the recipe; label-words (classification recipes): "
               "the label whose words the model finds likeliest after the prompt, never an invalid answer, with "
               "every label's probability")
TASKS = ("causal-lm", "seq-cls", "token-cls")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (and, for the CLI, argparse extras: action, choices, metavar, ...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def data_recipe(recipe: str | None, columns: dict[str, str] | None, metric: str | None,
                instruction: str | None) -> dict[str, Any]:
    """The `recipe`/`columns` arguments of the data loaders: the declared recipe (its columns, metric and
    instruction applied), or no recipe and the plain column renames."""
    if not recipe:
        return {"recipe": None, "columns": columns}
    from loraforge.data.recipes import make_recipe

    return {"recipe": make_recipe(recipe, columns, metric, instruction), "columns": None}


LORA_INITS = ("default", "gaussian", "loftq", "pissa")


@dataclass
class MixSpec:
    """One dataset of a `mix` (joint multi-task training): its file, how its records become examples (each dataset
    its own recipe), and its weight in the draw (see `TrainConfig.mix_temperature`). Validated on creation."""

    data: str = field(metadata={"help": "this dataset's training file (any reader's format)"})
    recipe: str | None = opt(None, "its task recipe (default: detect text/instruction/chat records)")
    columns: dict[str, str] | None = opt(None, "its field renames, ours=theirs (a mapping, or input=q,output=a)")
    metric: str | None = opt(None, METRIC_HELP)
    instruction: str | None = opt(None, INSTRUCTION_HELP)
    data_format: str | None = opt(None, "its record shape when not detected")
    file_format: str | None = opt(None, "its reader when the suffix does not say")
    max_examples: int = opt(0, "a seeded sample of N of its records (0: all)")
    weight: float = opt(1.0, "scales its size in the mixing probability: (weight x examples)^(1/T)")
    val_data: str | None = opt(None, "its validation file, read with its recipe")

    def __post_init__(self) -> None:
        if isinstance(self.data, Path):
            self.data = str(self.data)
        if not isinstance(self.data, str) or not self.data.strip():
            raise LoraforgeError(f"data must name this dataset's training file, got {self.data!r}")
        for name in ("recipe", "metric", "instruction", "data_format", "file_format", "val_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LoraforgeError(f"{name} must be a string, got {value!r}")
        if isinstance(self.columns, str):
            self.columns = parse_mapping(self.columns)
        elif isinstance(self.columns, dict):
            self.columns = {str(k): str(v) for k, v in self.columns.items()}
        elif self.columns is not None:
            raise LoraforgeError(f"columns must be a mapping ours: theirs (or input=q,output=a), got {self.columns!r}")
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise LoraforgeError(f"max_examples must be a whole number >= 0, got {self.max_examples!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 < self.weight < math.inf:
            raise LoraforgeError(f"weight must be a positive number, got {self.weight!r}")
        self.weight = float(self.weight)
        if (self.metric or self.instruction is not None) and not self.recipe:
            raise LoraforgeError("metric and instruction shape a recipe: add recipe (text2text for your own columns)")
        if self.recipe and self.data_format:
            raise LoraforgeError(f"give a recipe ({self.recipe!r}) or a data_format ({self.data_format!r}), not both")
        from loraforge.data.formats import FORMATS
        from loraforge.data.readers import FILE_FORMATS

        if self.data_format is not None and self.data_format not in FORMATS:
            raise LoraforgeError(f"data_format {self.data_format!r}: choose one of {', '.join(FORMATS)}")
        if self.file_format is not None and self.file_format not in FILE_FORMATS:
            raise LoraforgeError(f"file_format {self.file_format!r}: choose one of {', '.join(FILE_FORMATS)}")
        self.data_recipe()  # a wrong recipe, column or metric fails here, before a model loads

    def data_recipe(self) -> dict[str, Any]:
        """How the data loaders read this dataset's records."""
        return data_recipe(self.recipe, self.columns, self.metric, self.instruction)


def parse_mix(value: Any) -> list[MixSpec] | None:
    """The `mix` option (a YAML list of mappings, or `MixSpec`s) as `MixSpec`s; errors name the entry: `mix[1]`."""
    if value is None:
        return None
    if isinstance(value, str):
        raise LoraforgeError("option 'mix' is a list of datasets: set it in the YAML config, e.g. mix: [{data: "
                             "a.jsonl, recipe: e2e}, {data: b.jsonl, weight: 2}], not as a flag")
    if not isinstance(value, (list, tuple)) or not value:
        raise LoraforgeError(f"option 'mix' must be a non-empty list of datasets (mappings with data: FILE), got "
                             f"{value!r}")
    specs = []
    for i, item in enumerate(value):
        where = f"mix[{i}]"
        if isinstance(item, MixSpec):
            item = dataclasses.asdict(item)
        if not isinstance(item, dict):
            raise LoraforgeError(f"{where} must be a mapping such as {{data: train.jsonl, recipe: e2e, weight: 1}}, "
                                 f"got {item!r}")
        options = {str(k).replace("-", "_"): v for k, v in item.items()}
        if options.get("data") is None:
            raise LoraforgeError(f"{where} needs data: this dataset's training file")
        try:
            specs.append(build_config(MixSpec, options, source=where))
        except LoraforgeError as err:
            text = str(err)
            raise LoraforgeError(text if text.startswith(where) else f"{where}: {text}") from None
    return specs


MIX_EXCLUSIVE = ("recipe", "columns", "metric", "instruction", "data_format", "file_format", "max_examples")
"""Top-level options that a `mix` takes per dataset instead."""


@dataclass
class TrainConfig:
    """Everything `loraforge train` needs. Validated on creation."""

    model: str = opt(DEFAULT_MODEL, "base model: a built-in name, a transformers folder or a .gguf file")
    task: str = opt("causal-lm", "what to train: causal-lm (a decoder writes the answer), seq-cls (an encoder's "
                                  "classifier head: one label per text) or token-cls (one tag per word)")
    labels: list[str] | None = opt(None, "seq-cls/token-cls: the label names in id order, comma-separated "
                                          "(default: those in the data, sorted)")
    data: str | None = opt(None, "training data: .jsonl/.json/.csv/.tsv/.txt file (or folder of .txt), or CoNLL")
    recipe: str | None = opt(None, "task recipe: sst2, pubmedqa, conll2003, dialogsum, scitldr, squad, cmrc2018, "
                                    "e2e, lm, or text2text: your own task from --columns input=...,output=... "
                                    "(default: detect text/instruction/chat records)")
    metric: str | None = opt(None, METRIC_HELP)
    instruction: str | None = opt(None, INSTRUCTION_HELP)
    data_format: str | None = opt(None, "record shape when not detected: text, text_chunks, instruction, "
                                         "prompt_completion, messages, sharegpt")
    columns: dict[str, str] | None = opt(None, "field renames, ours=theirs: instruction=en_instruction,output=en_output")
    file_format: str | None = opt(None, "reader when the suffix does not say: jsonl, json, csv, tsv, text, conll")
    max_examples: int = opt(0, "train on a seeded sample of N records (few-shot; stratified for classification)")
    mix: list[MixSpec] | None = opt(
        None, "joint multi-task training, in the YAML instead of data: a list of datasets mixed into one adapter, "
              "each a mapping with data and optionally recipe, columns, metric, instruction, data_format, "
              "file_format, max_examples, weight (1.0), val_data")
    mix_temperature: float = opt(
        1.0, "mix: dataset i is drawn with probability proportional to (weight_i x n_i)^(1/T), n_i its examples: "
             "T=1 is proportional to size, a large T tends to uniform (T5/mT5 temperature sampling)")
    output: str | None = opt(None, "folder for the adapter, resolved config and train_summary.json")
    overwrite: bool = opt(False, "train into an --output that already holds a finished adapter, replacing it")
    per_user: str | None = opt(None, "train one adapter per value of this record field (a user, customer, ...) into "
                                      "OUTPUT/<value>/, loading the base and tokenizing the data once; max_steps, "
                                      "max_examples and val_split apply to each")
    r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha; the update is scaled by lora_alpha / r")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input during training")
    target_modules: list[str] | str | None = opt(
        None, "modules to wrap: comma-separated name suffixes, a regex, or all-linear (default: per architecture)")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA parameters")
    warmup_steps: int = opt(0, "linear warmup steps before the schedule's decay")
    schedule: str = opt("cosine", "learning-rate schedule after warmup: cosine, linear or constant")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: the B matrices' lr is lr x this ratio (0 = off; the paper uses 16)")
    label_smoothing: float = opt(0.0, "label smoothing of the training loss (the LoRA paper's E2E run: 0.1); "
                                       "validation loss stays plain cross-entropy")
    max_grad_norm: float = opt(1.0, "clip the adapter's gradient norm to this (0 = no clipping)")
    max_steps: int = opt(100, "optimizer steps to run (see epochs)")
    epochs: float = opt(0.0, "passes over the training data; when set, max_steps is computed from it (rows / "
                              "(batch_size x grad_accum) per pass)")
    batch_size: int = opt(8, "examples (or packed rows) per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    max_length: int = opt(256, "tokens per example; longer ones are truncated (and counted)")
    packing: bool = opt(True, "pack several examples into each row (attention stays within each example)")
    seed: int = opt(0, "seed for LoRA init, data order and dropout: the same seed gives the same run")
    dtype: str = opt("auto", "compute dtype of the frozen base: bfloat16 (fast; LoRA weights and optimizer stay "
                              "float32), float32 (exact), or auto: bfloat16 where the hardware has it")
    quantize: str = opt("none", "QLoRA: keep the frozen base packed in 4 bits. nf4 (QLoRA's NormalFloat, blocks of 64: "
                                "0.5625 bytes a weight), nf4-dq (double-quantized scales: 0.516), gguf (a GGUF model's "
                                "own blocks, e.g. the default model's Q4_1: no added error), nf4-all / nf4-dq-all "
                                "(the input embedding and output head packed too: least memory, the head's logits "
                                "carry NF4's error), or none",
                        choices=QUANTIZE_METHODS)
    lora_init: str = opt("default", "how LoRA starts: default (A kaiming-uniform, B zero: the base unchanged), gaussian "
                                    "(A normal(1/r), B zero), or loftq (with quantize nf4/nf4-dq: A and B fit the "
                                    "quantization error, so base + adapter starts nearer the dense model), or pissa "
                                    "(A and B the base weight's top-r singular part, the frozen base the rest; saved "
                                    "as an ordinary rank-2r adapter on the original base)",
                         choices=LORA_INITS)
    loftq_iter: int = opt(1, "lora_init loftq: alternations of quantize and SVD (1-5); above 1 the packed base itself "
                             "moves, and is saved beside the adapter (loftq_base.safetensors) for every later load")
    on_bad_record: str = opt("error", "what a malformed record does: error (stop) or skip (count and go on)")
    log_every: int = opt(1, "steps between progress-bar updates")
    val_data: str | None = opt(None, "validation file (same format as data)")
    val_split: float = opt(0.0, "fraction of the training records held out for validation when no val_data")
    eval_every: int = opt(0, "evaluate on the validation set every N steps (0 = only at the end)")
    early_stopping: int = opt(0, "stop after N evaluations without a better validation loss (0 = never)")
    save_every: int = opt(0, "write checkpoints/step-N every N steps (0 = only on SIGINT/SIGTERM)")
    keep_checkpoints: int = opt(2, "how many step-N checkpoints to keep (the best one is kept apart)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~30% slower")
    release_memory: bool = opt(True, "CPU: hand freed memory back to the OS after each step (~10% less peak RSS); "
                                     "false keeps it in the heap for the next step: faster where steps are short "
                                     "(SST-2's 8 x 128 tokens: 2.32 -> 1.87 s a step), as the pages are not "
                                     "faulted in again")
    compile: bool = opt(False, "torch.compile the model (slow start, can be faster on long runs)")
    threads: int = opt(0, "torch CPU threads (0: one per CPU that other processes leave free, re-decided every "
                           "step)")
    device: str = opt("cpu", "where to train: cpu, cuda, cuda:N, or auto (a CUDA GPU when there is one); under "
                              "torchrun each rank takes cuda:LOCAL_RANK")
    strategy: str = opt("ddp", "under torchrun: ddp (each rank holds the model, gradients averaged) or fsdp "
                                "(FSDP2: fully_shard per decoder layer)")

    def __post_init__(self) -> None:
        self.target_modules = parse_targets(self.target_modules)
        if self.task not in TASKS:
            raise LoraforgeError(f"option 'task' must be one of {', '.join(TASKS)}, got {self.task!r}")
        if isinstance(self.labels, str):
            self.labels = [name.strip() for name in self.labels.split(",") if name.strip()]
        elif isinstance(self.labels, (list, tuple)):  # YAML may give numbers: labels: [0, 1]
            self.labels = [str(name).strip() for name in self.labels]
        if self.labels is not None and (self.task == "causal-lm" or len(set(self.labels)) != len(self.labels)
                                        or len(self.labels) < 2):
            raise LoraforgeError(f"option 'labels' ({self.labels}) takes two or more distinct names, and only with "
                                 "task seq-cls or token-cls")
        if self.per_user is not None and (self.task != "causal-lm" or self.val_data):
            raise LoraforgeError("option 'per_user' trains causal-lm adapters, each validated on its own val_split; "
                                 "drop task/val_data")
        for name in ("r", "max_steps", "batch_size", "max_length", "log_every", "grad_accum", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LoraforgeError(f"option {name!r} must be a positive integer, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise LoraforgeError(f"option 'warmup_steps' must be a whole number >= 0, got {self.warmup_steps!r}")
        if not self.weight_decay >= 0:
            raise LoraforgeError(f"option 'weight_decay' must be >= 0, got {self.weight_decay!r}")
        if not self.lr > 0:
            raise LoraforgeError(f"option 'lr' must be positive, got {self.lr!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise LoraforgeError(f"option 'dtype' must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_METHODS:
            raise LoraforgeError(f"option 'quantize' must be one of {', '.join(QUANTIZE_METHODS)}, got "
                                 f"{self.quantize!r}")
        if self.lora_init not in LORA_INITS:
            raise LoraforgeError(f"option 'lora_init' must be one of {', '.join(LORA_INITS)}, got {self.lora_init!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or not 1 <= self.loftq_iter <= 5:
            raise LoraforgeError(f"option 'loftq_iter' must be a whole number from 1 to 5, got {self.loftq_iter!r}")
        if self.loftq_iter > 1 and self.lora_init != "loftq":
            raise LoraforgeError("option 'loftq_iter' counts LoftQ's alternations: it needs lora_init loftq")
        if self.lora_init == "pissa" and self.quantize != "none":
            raise LoraforgeError("lora_init pissa moves the frozen base to W minus its top-r part, which a packed base "
                                 "cannot hold: use it with quantize none; for a 4-bit base, lora_init loftq")
        if self.lora_init == "loftq" and (self.quantize not in ("nf4", "nf4-dq") or self.per_user):
            raise LoraforgeError("lora_init loftq fits the NF4 quantization error of a dense base: use it with "
                                 "--quantize nf4 or nf4-dq, and without per_user (each user would move the base)")
        if isinstance(self.columns, str):
            self.columns = parse_mapping(self.columns)
        self.mix = parse_mix(self.mix)
        self._check_mix()
        if (self.metric or self.instruction is not None) and not self.recipe:
            raise LoraforgeError("options 'metric' and 'instruction' shape a recipe: add --recipe (text2text for your "
                                 "own columns)")
        if self.task == "causal-lm":  # a wrong column, metric or recipe name fails here, before a model loads
            self.data_recipe()
        for name in ("eval_every", "early_stopping", "save_every", "threads", "max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LoraforgeError(f"option {name!r} must be a whole number >= 0, got {value!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise LoraforgeError(f"option 'schedule' must be cosine, linear or constant, got {self.schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LoraforgeError(f"option 'label_smoothing' must be in [0, 1), got {self.label_smoothing!r}")
        if not self.epochs >= 0:
            raise LoraforgeError(f"option 'epochs' must be >= 0, got {self.epochs!r}")
        if not 0.0 <= self.val_split < 1.0:
            raise LoraforgeError(f"option 'val_split' must be in [0, 1), got {self.val_split!r}")
        if not (self.loraplus_lr_ratio >= 0 and self.max_grad_norm >= 0):
            raise LoraforgeError("options 'loraplus_lr_ratio' and 'max_grad_norm' must be >= 0")
        if self.strategy not in ("ddp", "fsdp"):
            raise LoraforgeError(f"option 'strategy' must be ddp or fsdp, got {self.strategy!r}")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise LoraforgeError(f"option 'device' must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.on_bad_record not in ("error", "skip"):
            raise LoraforgeError(f"option 'on_bad_record' must be error or skip, got {self.on_bad_record!r}")

    def _check_mix(self) -> None:
        """`mix` replaces `data` and the per-dataset options; it trains one causal-LM adapter."""
        t = self.mix_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise LoraforgeError(f"option 'mix_temperature' must be a positive number, got {t!r}")
        self.mix_temperature = float(t)
        if self.mix is None:
            return
        if self.data:
            raise LoraforgeError("give the training data as 'data' or as 'mix' (a list of datasets), not both")
        if self.task != "causal-lm" or self.per_user is not None:
            raise LoraforgeError("option 'mix' trains one causal-lm adapter on several datasets; it does not go with "
                                 "task seq-cls/token-cls or per_user")
        given = [name for name in MIX_EXCLUSIVE if getattr(self, name)]
        if given:
            raise LoraforgeError(f"with 'mix', give {', '.join(given)} in each mix entry, not at the top level")
        if self.val_data and any(spec.val_data for spec in self.mix):
            i = next(i for i, spec in enumerate(self.mix) if spec.val_data)
            raise LoraforgeError(f"mix[{i}] has its own val_data: give val_data in the mix entries or at the top "
                                 "level, not both")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_recipe(self) -> dict[str, Any]:
        """How the data loaders read records."""
        return data_recipe(self.recipe, self.columns, self.metric, self.instruction)


RECIPE_OPTIONS = ("recipe", "columns", "metric", "instruction")
"""The options that declare a recipe: an adapter keeps them in its train_config.yaml for eval and predict."""


def with_adapter_recipe(given: dict[str, Any], adapter: str | Path | None) -> dict[str, Any]:
    """The recipe options `given` (as RECIPE_OPTIONS) for eval and predict: with no recipe given, the unset ones
    are the adapter's own, so a task declared once in training is scored without repeating it."""
    declared = adapter_recipe(adapter) if given.get("recipe") is None and adapter is not None else {}
    return {k: declared.get(k) if given.get(k) is None else given[k] for k in RECIPE_OPTIONS} if declared else given


def adapter_recipe(adapter: str | Path) -> dict[str, Any]:
    """The recipe options an adapter was trained with (from its train_config.yaml), or {} when it has none."""
    saved = saved_train_config(adapter)
    return {k: saved.get(k) for k in RECIPE_OPTIONS} if saved.get("recipe") else {}


def saved_train_config(adapter: str | Path) -> dict[str, Any]:
    """The options an adapter was trained with (its train_config.yaml), or {} when it has none."""
    path = Path(adapter) / TRAIN_CONFIG_FILE
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return saved if isinstance(saved, dict) else {}


QUANTIZE_HELP = ("the frozen base packed: nf4, nf4-dq, gguf (a GGUF model's own blocks), nf4-all / nf4-dq-all (the "
                 "embedding and head packed too) or none (default: what the adapters were trained on, else none)")


def load_quantize(cfg: TrainConfig) -> str:
    """How training loads the base: packed as `quantize`, or dense for LoftQ (which packs it at injection)."""
    return "none" if cfg.lora_init == "loftq" else cfg.quantize


def adapter_quantize(adapters: list[str | Path]) -> str:
    """The packed base the adapters were trained on (`quantize` in their train_config.yaml; "none" when absent), the
    default for loading them: that is the function they were trained against. Adapters that disagree are refused."""
    found = {saved_train_config(adapter).get("quantize", "none") for adapter in adapters}
    if len(found) > 1:
        raise LoraforgeError(f"the adapters were trained on different bases (quantize: {', '.join(sorted(found))}); "
                             "give --quantize to load them on one, or run them separately")
    return found.pop() if found else "none"


def parse_targets(value: list[str] | str | None) -> list[str] | str | None:
    """`q_proj,v_proj` or `c_attn` -> a list of name suffixes; `all-linear` and anything else (a regex) as given."""
    if isinstance(value, str) and value != "all-linear" and re.fullmatch(r"[\w.\s,-]+", value):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into a dict of options (validated later, together with the CLI flags)."""
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LoraforgeError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError as err:
        raise LoraforgeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoraforgeError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, options: dict[str, Any], source: str) -> Any:
    """Instantiate a config dataclass, rejecting unknown keys with the list of known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LoraforgeError(f"{source}: unknown option(s) {unknown}. Known options: {', '.join(known)}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: _coerce(v, types[k], f"{source}: option {k!r}") for k, v in options.items()})
    except TypeError as err:  # a wrongly typed value that the validation did not name
        raise LoraforgeError(f"{source}: {err}") from None


def _coerce(value: Any, type_name: str, where: str) -> Any:
    # YAML 1.1 reads "2e-4" as a string, and flags arrive as strings: convert plain int/float fields.
    caster = {"int": int, "float": float, "bool": parse_bool}.get(type_name)
    if caster is None or not isinstance(value, str):
        return value
    try:
        return caster(value)
    except ValueError:
        raise LoraforgeError(f"{where} must be {type_name}, got {value!r}") from None


def parse_bool(value: str | bool) -> bool:
    """`true/false/yes/no/1/0/on/off` (any case) as a bool, for flags and YAML strings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a yes/no value: {value!r}")


def parse_mapping(value: str) -> dict[str, str]:
    """`a=b,c=d` as {"a": "b", "c": "d"}: the CLI form of a mapping option."""
    pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise LoraforgeError(f"expected name=value pairs separated by commas, got {value!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` is bfloat16 where matmuls run natively in it on `device` (a CUDA GPU with bf16, or a CPU with
    AVX512-BF16/AMX through oneDNN), else float32: emulated bf16 is slower than fp32. The dtype follows the device:
    a CPU run on a machine that also has a GPU decides by the CPU."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
