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

from loraforge.config import DEFAULT_MODEL, INSTRUCTION_HELP, METRIC_HELP, opt, parse_targets
from loraforge.errors import LoraforgeError


@dataclass
class DeviceOptions:
    dtype: str = opt("float32", "auto: bfloat16 where this CPU/GPU runs it natively (much faster), else float32",
                     choices=("float32", "bfloat16", "auto"))
    device: str = opt("cpu", "auto, cpu, cuda or cuda:N")


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
