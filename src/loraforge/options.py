"""Every subcommand's options as one typed dataclass (litgpt's idea; train's is `config.TrainConfig`, eval's
`eval.config.EvalConfig`).

The CLI builds each subcommand's flags from these fields (name, type, default, help, and argparse extras such as
`action="append"` in the metadata), and the command receives the dataclass, validated on creation. An option is
written once, here, and documented once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loraforge.config import (ANSWER_HELP, ANSWERS, DEFAULT_MODEL, INSTRUCTION_HELP, METRIC_HELP, QUANTIZE_HELP,
                              QUANTIZE_METHODS, opt, parse_mapping, parse_targets)
from loraforge.errors import LoraforgeError


@dataclass
class DeviceOptions:
    dtype: str = opt("float32", "auto: bfloat16 where this CPU/GPU runs it natively (much faster), else float32",
                     choices=("float32", "bfloat16", "auto"))
    device: str = opt("cpu", "auto, cpu, cuda or cuda:N")
    quantize: str | None = opt(None, QUANTIZE_HELP, choices=QUANTIZE_METHODS)


@dataclass
class SamplingOptions:
    max_new_tokens: int = opt(64, "tokens generated per answer at most")
    greedy: bool = opt(False, "greedy decoding (the default)", action="store_true", group="mode")
    temperature: float | None = opt(None, "sample with this temperature instead of greedy", group="mode")
    top_p: float = opt(1.0, "nucleus sampling threshold (with --temperature)")
    top_k: int = opt(0, "sample from the k likeliest tokens (0: all)")
    seed: int = opt(0, "seed of the sampling generator (with --temperature)")

    def __post_init__(self) -> None:
        _at_least(self, "max_new_tokens", 1)


@dataclass
class GenerateOptions(SamplingOptions, DeviceOptions):
    prompt: str | None = opt(None, "the text to continue, or the user turn with --chat", required=True)
    model: str | None = opt(None, f"base model (default: the adapters' base, else {DEFAULT_MODEL})")
    adapter: list[str] | None = opt(None, "adapter folder, or a name in --adapters; repeat to answer with each (one "
                                          "mixed batch)", action="append", metavar="DIR_OR_NAME")
    adapters: str | None = opt(None, "an adapter store: DIR/<name>/ (e.g. from train --per-user)", metavar="DIR")
    max_resident_mb: float = opt(0.0, "with --adapters: cap on resident adapters")
    chat: bool = opt(False, "wrap the prompt in the model's chat template", action="store_true")
    system: str | None = opt(None, "with --chat: the system prompt (default: the one the adapter was trained "
                                   "with, else the template's own)")
    router: str | None = opt(None, "a router folder (loraforge router): it picks the adapter that answers the prompt, "
                                   "among exactly the --adapter given", metavar="DIR")


@dataclass
class RouterOptions(DeviceOptions):
    adapter: list[str] | None = opt(None, "adapter folder, or a name in --adapters: one class of the router each; "
                                          "repeat", action="append", required=True, metavar="DIR_OR_NAME")
    data: list[str] | None = opt(None, "NAME=FILE: inputs of adapter NAME's task (any format train reads); one per "
                                       "adapter, repeat", action="append", required=True, metavar="NAME=FILE")
    output: str | None = opt(None, "folder for router.safetensors and router.json", required=True, metavar="DIR")
    model: str | None = opt(None, f"base model (default: the adapters' base, else {DEFAULT_MODEL})")
    adapters: str | None = opt(None, "an adapter store: DIR/<name>/ (e.g. from train --per-user)", metavar="DIR")
    recipe: list[str] | None = opt(None, "NAME=RECIPE: how NAME's records become prompts (default: the recipe the "
                                         "adapter was trained with, else text/instruction/chat records); repeat",
                                   action="append", metavar="NAME=RECIPE")
    columns: list[str] | None = opt(None, "NAME=ours=theirs,...: field renames for NAME's file (e.g. "
                                          "sentiment=text=sentence); repeat", action="append", metavar="NAME=MAP")
    file_format: list[str] | None = opt(None, "NAME=FORMAT: the reader for NAME's file when its suffix does not say "
                                              "(jsonl, json, csv, tsv, text, conll); repeat", action="append",
                                        metavar="NAME=FORMAT")
    base_data: str | None = opt(None, "inputs of no task: a 'base' class, answered by the base with no adapter",
                                metavar="FILE")
    max_examples: int = opt(200, "prompts per class at most (a seeded sample)")
    val_split: float = opt(0.2, "share of each class held out to measure the router's accuracy (0: none)")
    seed: int = opt(0, "seed of the sample and the split")
    l2: float = opt(1e-3, "L2 penalty of the probe (on standardized features)")
    max_length: int = opt(512, "prompt tokens read per input (the first ones)")
    layer: int = opt(-1, "hidden states the probe reads: -1 the last (after the final norm), i the output of decoder "
                         "layer i, which stops the routing forward there (cheaper: i/L of a prefill)")

    def __post_init__(self) -> None:
        _at_least(self, "max_examples", 1)
        _at_least(self, "max_length", 1)
        if not 0 <= self.val_split < 1:
            raise LoraforgeError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.l2 < 0:
            raise LoraforgeError(f"--l2 must be 0 or more, got {self.l2}")
        self.datasets()  # a malformed NAME=VALUE fails here, with its flag

    def datasets(self) -> dict[str, dict[str, Any]]:
        """Per class: its file, recipe, column renames and reader, from --data (and --base-data: class "base"),
        --recipe, --columns and --file-format."""
        files = _named(self.data, "--data", "FILE")
        if "base" in files:
            raise LoraforgeError("--data base=...: 'base' is the class of inputs of no task; give it as --base-data")
        if self.base_data:
            files["base"] = self.base_data
        found = {name: {"path": path, "recipe": None, "columns": None, "file_format": None}
                 for name, path in files.items()}
        for flag, key, values in (("--recipe", "recipe", self.recipe), ("--columns", "columns", self.columns),
                                  ("--file-format", "file_format", self.file_format)):
            for name, value in _named(values, flag, key.upper()).items():
                if name not in found:
                    raise LoraforgeError(f"{flag} {name}=...: no --data {name}=FILE to apply it to")
                found[name][key] = parse_mapping(value) if key == "columns" else value
        return found


def _named(values: list[str] | None, flag: str, what: str) -> dict[str, str]:
    """`NAME=VALUE` flags (split at the first '=') as {NAME: VALUE}; a name given twice is an error."""
    named: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise LoraforgeError(f"{flag} {value!r}: write it as NAME={what}, with NAME an adapter's name")
        if name.strip() in named:
            raise LoraforgeError(f"{flag} was given twice for {name.strip()!r}; give it once per adapter")
        named[name.strip()] = rest.strip()
    return named


@dataclass
class InspectOptions:
    model: str = opt(DEFAULT_MODEL, "the model whose layers to list")
    r: int = opt(16, "LoRA rank for the parameter count")
    target_modules: list[str] | str | None = opt(None, "modules to wrap: comma-separated name suffixes, a regex, or "
                                                       "all-linear (default: per architecture)")

    def __post_init__(self) -> None:
        self.target_modules = parse_targets(self.target_modules)
        _at_least(self, "r", 1)


@dataclass
class MergeOptions:
    adapter: list[str] | None = opt(None, "the adapter folder (once)", action="append", required=True)
    output: str | None = opt(None, "folder for the merged model (new or empty)", required=True)
    model: str | None = opt(None, "base model (default: the adapter's base_model_name_or_path)")
    dtype: str = opt("auto", "weights of the merged model: auto (the base's own, as its folder stores them), "
                             "float32, bfloat16 or float16", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class ExportOptions:
    adapter: list[str] | None = opt(None, "the adapter folder (once)", action="append", required=True)
    output: str | None = opt(None, "the .gguf file to write", required=True, metavar="FILE.gguf")
    format: str = opt("gguf", "file format (gguf: llama.cpp, Ollama, LM Studio)", choices=("gguf",))
    merged: bool = opt(False, "write the whole model, base + update, instead of an adapter for the base's GGUF",
                       action="store_true")
    quant: str = opt("q8_0", "with --merged: the adapted weights' type (f32, f16, bf16, q8_0; q4_0, q4_1, q5_0, q5_1 "
                             "lose most of a small update: the retention is printed)",
                     choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"))
    dtype: str = opt("f16", "the adapter's tensors (f32, f16, q8_0)", choices=("f32", "f16", "q8_0"))
    model: str | None = opt(None, "the base, a built-in name or a .gguf file (default: the adapter's base)")
    ollama: bool = opt(False, "also write a Modelfile beside the output (FROM + ADAPTER, or FROM the merged file)",
                       action="store_true")


@dataclass
class CombineOptions:
    adapter: list[str] | None = opt(None, "an adapter folder; repeat for each adapter to combine (same base)",
                                    action="append", required=True)
    output: str | None = opt(None, "folder for the combined adapter (new or empty)", required=True)
    method: str | None = opt(None, "cat (exact weighted sum of the updates, rank = sum of ranks), linear (PEFT's: "
                                   "mixes A's and B's, equal ranks, not the weighted sum), svd (weighted sum truncated "
                                   "to --rank), ties, dare_linear, dare_ties, magnitude_prune (prune the updates to "
                                   "--density, then SVD to --rank)", required=True)
    weights: str | None = opt(None, "one weight per --adapter, comma-separated, in order (default: 1 each; a leading "
                                    "minus needs '=': --weights=-1,1)")
    rank: int | None = opt(None, "SVD methods: the output rank (default: the largest input rank)")
    density: float | None = opt(None, "ties, dare_*, magnitude_prune: the share of each update kept, in (0, 1]")
    majority_sign: str = opt("total", "ties, dare_ties: elect each entry's sign by the sum of the updates (total) or "
                                      "by the count of signs (frequency)", choices=("total", "frequency"))
    seed: int = opt(0, "dare_*: seed of the random drop mask")

    def __post_init__(self) -> None:
        self.weight_values()  # a typo fails here, with the flag's name

    def weight_values(self) -> list[float] | None:
        """--weights as numbers (None: not given)."""
        if self.weights is None:
            return None
        try:
            return [float(w) for w in self.weights.split(",")]
        except ValueError:
            raise LoraforgeError(f"--weights must be comma-separated numbers (one per --adapter), got "
                                 f"{self.weights!r}") from None


@dataclass
class PredictOptions(DeviceOptions):
    data: str | None = opt(None, "records to predict (any format `train` reads)", required=True)
    model: str | None = opt(None, "base model (default: the adapter's base)")
    adapter: list[str] | None = opt(None, "adapter folder (once); one with labels.json is a seq-cls/token-cls head",
                                    action="append")
    recipe: str | None = opt(None, "decoder: the task recipe (sst2, conll2003, squad, e2e, text2text, ...; default: "
                                   "the one the adapter was trained with); head: reads records")
    metric: str | None = opt(None, METRIC_HELP)
    instruction: str | None = opt(None, INSTRUCTION_HELP)
    task: str | None = opt(None, "default: the adapter's (labels.json), else causal-lm",
                           choices=("seq-cls", "token-cls", "causal-lm"))
    columns: str | None = opt(None, "field renames, ours=theirs: text=sentence")
    file_format: str | None = opt(None, "reader when the suffix does not say: jsonl, json, csv, tsv, text, conll")
    output: str | None = opt(None, "write one JSON line per record: prediction, reference, generated text")
    max_examples: int = opt(0, "predict only the first N records (0 = all)")
    batch_size: int = opt(16, "records per forward")
    max_length: int = opt(512, "head: tokens per record; longer ones are cut")
    max_new_tokens: int = opt(64, "decoder: tokens generated per answer")
    answer: str = opt("generate", "decoder: " + ANSWER_HELP, choices=ANSWERS)


@dataclass
class ServeOptions(DeviceOptions):
    model: str | None = opt(None, f"base model, a name or a folder (default: {DEFAULT_MODEL})")
    adapters: str | None = opt(None, "adapter store: DIR/<name>/, each served as model <name>", metavar="DIR")
    host: str = opt("127.0.0.1", "address to bind; anything but loopback needs --api-key")
    port: int = opt(8000, "port (0: any free one; the log says which)")
    api_key: str | None = opt(None, "clients send 'Authorization: Bearer KEY' (default: $LORAFORGE_API_KEY)")
    max_resident_mb: float = opt(0.0, "cap on adapters held in memory (0: none)")
    max_batch: int = opt(16, "requests decoded together")
    max_queue: int = opt(64, "requests waiting beyond the batch; more get 429")
    max_tokens_cap: int = opt(2048, "largest max_tokens a request may ask for")
    max_body_kb: int = opt(1024, "largest request body; more gets 413")

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_cap", "max_body_kb"):
            _at_least(self, name, 1)
        if not 0 <= self.port <= 65535:
            raise LoraforgeError(f"--port must be 0-65535, got {self.port}")


@dataclass
class DemoOptions:
    steps: int = opt(40, "training steps")
    output: str = opt("runs/demo", "folder for the demo's adapter")


def _at_least(options: Any, name: str, low: int) -> None:
    value = getattr(options, name)
    if value < low:
        raise LoraforgeError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def from_namespace(cls: type, namespace: Any) -> Any:
    """The options dataclass from parsed flags (every field is a flag of the same name)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
