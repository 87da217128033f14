"""Evaluate a base model, optionally with K in-context examples, and LoRA adapters on the same records.

Two kinds of task:
- `generate` (every recipe but `lm`): each example's prompt (`recipe.encode_prompt`, the prompt training used) is
  continued by batched greedy or beam-search decoding (`infer.batch`), the text is read back with
  `recipe.parse_prediction` and scored with the recipe's metric against `recipe.reference`. Classification recipes
  score accuracy and macro-F1 with their label names as the valid answers.
- `text` (the `lm` recipe, or any data file without a recipe): perplexity over the tokens each example learns
  in training (all of a text record, the response of an instruction record), no generation.

Records that share an input are one example for multi-reference metrics (`MULTI_REFERENCE_METRICS`): consecutive
records with the same prompt (E2E lists one MR once per reference) are scored once, against all their references,
as the E2E and GEM scripts do. `max_examples` keeps the first N examples in file order (after that grouping), so
every model sees the same records, run after run.

One `InferenceSession` per base holds the base and every adapter made for it: the base is loaded once, each adapter
is added to it (not a fresh base per adapter), and each row runs with its own adapter routed (`session.use`), so
no adapter leaks into another row. Adapters for different bases (without `model`) get one session per base.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.config import DEFAULT_MODEL, INSTRUCTION_HELP, METRIC_HELP, adapter_recipe, opt, parse_mapping
from loraforge.data import IGNORE_INDEX, Record, Recipe, collate, load_examples, make_recipe, pad_id_for, read_records
from loraforge.data.recipes import Classification
from loraforge.data.tokenize import TokenizedExample, tokenize_example
from loraforge.errors import LoraforgeError
from loraforge.eval.fewshot import encode_few_shot, pick_shots
from loraforge.infer.batch import BatchOptions, generate_batch
from loraforge.infer.predict import score_recipe
from loraforge.infer.session import InferenceSession
from loraforge.metrics import MULTI_REFERENCE_METRICS, perplexity

log = logging.getLogger("loraforge")

TASKS = ("generate", "text")
ANSWERS = ("generate", "label-words")
DTYPES = ("float32", "bfloat16", "auto")  # auto: config.resolve_dtype (bfloat16 where the CPU/GPU runs it natively)
HEAD_CHUNK_ROWS = 1024


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What `loraforge eval` runs; each field is one flag (`--adapter` for `adapters`, repeated), built by the CLI."""

    data: str = opt(None, "records to score, e.g. a dev split (never the official test)", required=True)
    recipe: str | None = opt(None, "task recipe (e2e, sst2, conll2003, squad, text2text, ...; default: the one the "
                                   "first adapter was trained with); lm or none: perplexity of the data file in its "
                                   "detected format")
    metric: str | None = opt(None, METRIC_HELP)
    instruction: str | None = opt(None, INSTRUCTION_HELP)
    model: str | None = opt(None, f"base model (default: the first adapter's base, else {DEFAULT_MODEL})")
    adapters: tuple[str, ...] = opt((), "adapter folder to compare; repeat for several, each evaluated on its base "
                                        "(--model if given, else its adapter_config's), one session per base",
                                    flag="adapter", action="append", metavar="DIR")
    task: str | None = opt(None, "generate and score with the recipe's metric, or text: perplexity (default: text "
                                 "for the lm recipe and for no recipe, else generate)", choices=TASKS)
    columns: dict[str, str] | None = opt(None, "field renames, ours=theirs: text=sentence")
    file_format: str | None = opt(None, "reader when the suffix does not say: jsonl, json, csv, tsv, text, conll "
                                        "(also for --few-shot-data)")
    data_format: str | None = opt(None, "record shape for --task text without a recipe (text, text_chunks, "
                                        "instruction, ...; default: detected)")
    max_examples: int = opt(0, "score the first N examples (0 = all; records sharing an input count once for "
                               "BLEU/ROUGE/QA)")
    few_shot: int = opt(0, "also score the base model with K in-context examples from --few-shot-data", metavar="K")
    few_shot_data: str | None = opt(None, "where the K examples come from, e.g. the training file (records with a "
                                          "scored prompt are skipped)", metavar="FILE")
    seed: int = opt(0, "seed of the few-shot draw")
    answer: str = opt("generate", "generate: the model writes its answer, parsed by the recipe; label-words "
                                  "(classification recipes): the label whose words the model finds likeliest "
                                  "after the prompt, never an invalid answer", choices=ANSWERS)
    num_beams: int = opt(1, "1 = greedy; more = beam search")
    max_new_tokens: int = opt(64, "tokens generated per answer at most")
    batch_size: int = opt(8, "prompts generated together (left-padded)")
    max_length: int = opt(512, "text task: tokens per example (longer ones are cut, lm text is chunked to this)")
    dtype: str = opt("float32", "float32, bfloat16, or auto: bfloat16 where this CPU/GPU runs it natively",
                     choices=DTYPES)
    device: str = opt("cpu", "auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "torch CPU threads (0 = torch's default, one per core); 1 is faster on a machine other "
                          "jobs keep busy")
    samples: int = opt(8, "examples shown side by side in the report")
    output: str = opt("runs/eval", "folder for results.json, predictions.jsonl, report.md, report.html and plots")

    def __post_init__(self) -> None:
        if not self.data:
            raise LoraforgeError("eval needs the records to score: --data FILE (a dev split)")
        object.__setattr__(self, "adapters", tuple(self.adapters or ()))  # flags arrive as a list, or None
        if isinstance(self.columns, str):
            object.__setattr__(self, "columns", parse_mapping(self.columns))
        if self.recipe is None and self.adapters:  # the recipe the adapter was trained with, declared once
            for name, value in adapter_recipe(self.adapters[0]).items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        task = self.task or ("text" if self.recipe in (None, "lm") else "generate")
        if task not in TASKS:
            raise LoraforgeError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if task == "generate" and self.recipe in (None, "lm"):
            raise LoraforgeError("task generate needs a task recipe (--recipe e2e, sst2, ...) other than lm")
        if self.answer not in ANSWERS:
            raise LoraforgeError(f"--answer {self.answer!r}: choose one of {', '.join(ANSWERS)}")
        if self.answer == "label-words" and not isinstance(make_recipe(self.recipe or "lm"), Classification):
            raise LoraforgeError(f"--answer label-words scores the label names of a classification recipe (sst2, "
                                 f"pubmedqa); {self.recipe or 'no recipe'} has none")
        if self.dtype not in DTYPES:
            raise LoraforgeError(f"dtype {self.dtype!r}: choose one of: {', '.join(DTYPES)}")
        if self.few_shot and (task != "generate" or not self.few_shot_data):
            raise LoraforgeError("--few-shot K needs a generation recipe and --few-shot-data FILE (e.g. the training "
                                 "file) to draw the K in-context examples from")
        for name in ("max_examples", "few_shot", "samples", "threads"):
            if getattr(self, name) < 0:
                raise LoraforgeError(f"{name} must be 0 or more, got {getattr(self, name)}")
        BatchOptions(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, batch_size=self.batch_size)
        object.__setattr__(self, "task", task)


@dataclass
class EvalExample:
    """One scored input: its record(s) (several when they share the input) and what the metric compares with."""

    records: list[Record]
    references: Any

    @property
    def record(self) -> Record:
        return self.records[0]


@dataclass
class ModelResult:
    """One row of the comparison: a model's scores on the examples, its speed, and its outputs."""

    name: str
    base: str
    adapter: str | None
    few_shot: int
    metrics: dict[str, float]
    n: int
    seconds: float
    """Generation (or scoring) time, without loading."""
    load_seconds: float
    tokens: int
    """Generated tokens (generate) or tokens read (text)."""
    rows: list[dict] = field(default_factory=list)
    """One predictions.jsonl row per example."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "adapter": self.adapter, "few_shot": self.few_shot,
                "metrics": {k: _finite(v) for k, v in self.metrics.items()}, "n": self.n,
                "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "tokens": self.tokens, "tokens_per_second": round(self.tokens_per_second, 1)}


@dataclass
class EvalResult:
    config: EvalConfig
    recipe: Recipe | None
    examples: list[EvalExample]
    models: list[ModelResult]
    shots: list[Record] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base: str
    adapter: str | None = None
    few_shot: int = 0


def load_eval_examples(path: str, recipe: Recipe, file_format: str | None = None,
                       max_examples: int = 0) -> list[EvalExample]:
    """The examples to score, in file order: one per record, or per run of records sharing a prompt when the
    recipe's metric takes several references; the first `max_examples` of them (0 = all)."""
    group = recipe.metric in MULTI_REFERENCE_METRICS
    examples: list[EvalExample] = []
    last_prompt = None
    for record in read_records(path, file_format):
        prompt = recipe.prompt(record)
        reference = recipe.reference(record)
        if group and examples and prompt == last_prompt:
            refs = examples[-1].references
            examples[-1].records.append(record)
            refs += [r for r in reference if r not in refs]
            continue
        if max_examples and len(examples) == max_examples:
            break
        examples.append(EvalExample([record], list(reference) if group else reference))
        last_prompt = prompt
    if not examples:
        raise LoraforgeError(f"{path}: no records to evaluate")
    return examples


def model_specs(cfg: EvalConfig) -> list[ModelSpec]:
    """The rows: the base (always), the base with K shots (if asked), then each adapter on its base."""
    from loraforge.lora import read_adapter_config

    adapter_bases = [cfg.model or read_adapter_config(a).base_model_name_or_path or DEFAULT_MODEL
                     for a in cfg.adapters]
    base = cfg.model or (adapter_bases[0] if adapter_bases else DEFAULT_MODEL)
    specs = [ModelSpec("base", base)]
    if cfg.few_shot:
        specs.append(ModelSpec(f"base {cfg.few_shot}-shot", base, few_shot=cfg.few_shot))
    names = {"base", specs[-1].name}
    for adapter, adapter_base in zip(cfg.adapters, adapter_bases):
        name = Path(adapter).resolve().name or adapter
        while name in names:
            name += "'"
        names.add(name)
        if adapter_base != base:
            log.warning("adapter %s is for base %s, the baseline is %s: compare with care", adapter, adapter_base, base)
        specs.append(ModelSpec(name, adapter_base, adapter=adapter))
    return specs


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Evaluate every model of `model_specs(cfg)`; write results, predictions and the report to `cfg.output`."""
    from loraforge.eval.report import write_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)  # now: an unwritable folder should fail before the models run
    recipe = make_recipe(cfg.recipe, cfg.columns, cfg.metric, cfg.instruction) if cfg.recipe else None
    examples = load_eval_examples(cfg.data, recipe, cfg.file_format, cfg.max_examples) \
        if cfg.task == "generate" else []
    shots: list[Record] = []
    if cfg.few_shot:
        scored = [recipe.prompt(ex.record) for ex in examples]
        shots = pick_shots(read_records(cfg.few_shot_data, cfg.file_format), recipe, cfg.few_shot, cfg.seed, scored)
    result = EvalResult(cfg, recipe, examples, [], shots)
    for spec, session, load_seconds in _sessions(model_specs(cfg), cfg):
        log.info("evaluating %s (%s%s)", spec.name, spec.base, f" + {spec.adapter}" if spec.adapter else "")
        if cfg.task == "generate":
            row = _evaluate_generation(spec, session, recipe, examples, shots, cfg)
        else:
            row = _evaluate_text(spec, session, recipe, cfg)
        row.load_seconds = load_seconds
        result.models.append(row)
    result.files["results"] = _write_results(result, output / "results.json")
    result.files["predictions"] = _write_predictions(result, output / "predictions.jsonl")
    result.files.update(write_report(result, output))
    return result


def _sessions(specs: list[ModelSpec], cfg: EvalConfig) -> Iterator[tuple[ModelSpec, InferenceSession, float]]:
    """Each spec with the session of its base (one per base, loaded once) and its load time: the base's for the
    first row on it, the adapter's own read-and-add time for an adapter row."""
    session: InferenceSession | None = None
    for spec in specs:
        start = time.perf_counter()
        if session is None or session.base != spec.base:
            session = None  # free the previous base before loading the next one
            session = InferenceSession.open(spec.base, dtype=cfg.dtype, device=cfg.device)
        if spec.adapter is not None:
            session.add_adapter(spec.name, spec.adapter)
        yield spec, session, time.perf_counter() - start


def _evaluate_generation(spec: ModelSpec, session: InferenceSession, recipe: Recipe, examples: list[EvalExample],
                         shots: list[Record], cfg: EvalConfig) -> ModelResult:
    tokenizer = session.tokenizer
    if spec.few_shot:
        prompts = [encode_few_shot(recipe, shots, ex.record, tokenizer) for ex in examples]
    else:
        prompts = [recipe.encode_prompt(ex.record, tokenizer) for ex in examples]
    options = BatchOptions(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, batch_size=cfg.batch_size)
    start = time.perf_counter()
    probabilities: list[dict[str, float] | None] = [None] * len(examples)
    if cfg.answer == "label-words":
        new_ids, probabilities = score_label_words(session, spec.name if spec.adapter else None, recipe, examples,
                                                   prompts, cfg.batch_size)
    else:
        new_ids = generate_batch(session, prompts, options, spec.name if spec.adapter else None)
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    parsed = [recipe.parse_prediction(text, ex.record) for text, ex in zip(texts, examples)]
    metrics = score_recipe(recipe, parsed, [ex.references for ex in examples])
    rows = [{"model": spec.name, "example": i, "where": ex.record.where, "input": recipe.prompt(ex.record)[1],
             "references": ex.references, "output": text, "parsed": p, "prompt_tokens": len(prompt)}
            | ({"probabilities": probs} if probs else {})
            for i, (ex, text, p, prompt, probs) in enumerate(zip(examples, texts, parsed, prompts, probabilities))]
    return ModelResult(spec.name, spec.base, spec.adapter, spec.few_shot, metrics, len(examples), seconds, 0.0,
                       sum(len(ids) for ids in new_ids), rows)


@torch.no_grad()
def score_label_words(session: InferenceSession, adapter: str | None, recipe: Classification,
                      examples: list[EvalExample], prompts: list[list[int]], batch_size: int
                      ) -> tuple[list[list[int]], list[dict[str, float]]]:
    """For each prompt, the continuation (a label name as training writes it, with its end-of-turn or EOS) that
    the model gives the highest probability: log P(continuation | prompt) summed over its tokens, one teacher-forced
    forward per (prompt, label). The prompt may be zero- or few-shot; the continuations come from the recipe's
    own training example, so the answer is always one of the labels, in the form the model was taught. Also each
    label's probability among the labels (the continuations' probabilities, normalized)."""
    tokenizer = session.tokenizer
    rows: list[TokenizedExample] = []
    options: list[list[list[int]]] = []
    for ex, prompt in zip(examples, prompts):
        conts = []
        for name in recipe.names:
            taught = tokenize_example(recipe._example(ex.record, name, tokenizer), tokenizer, 10**9)
            start = len(recipe.encode_prompt(ex.record, tokenizer))
            conts.append(taught.input_ids[start:])
            rows.append(TokenizedExample(prompt + taught.input_ids[start:],
                                         [IGNORE_INDEX] * len(prompt) + taught.input_ids[start:]))
        options.append(conts)
    nll = torch.empty(len(rows), dtype=torch.float64)
    pad = pad_id_for(tokenizer)
    with session.use(adapter) as model:
        for first in range(0, len(rows), batch_size):
            nll[first:first + batch_size] = token_nll(model, collate(rows[first:first + batch_size], pad))[0]
    nll = nll.view(len(examples), len(recipe.names))
    probs = (-nll).softmax(dim=1).tolist()
    best = nll.argmin(dim=1).tolist()
    return ([conts[k] for conts, k in zip(options, best)],
            [{name: round(p, 6) for name, p in zip(recipe.names, row)} for row in probs])


@torch.no_grad()
def _evaluate_text(spec: ModelSpec, session: InferenceSession, recipe: Recipe | None, cfg: EvalConfig) -> ModelResult:
    tokenizer = session.tokenizer
    examples, _ = load_examples(cfg.data, tokenizer, cfg.max_length, recipe=recipe, fmt=cfg.data_format,
                                columns=None if recipe else cfg.columns, file_format=cfg.file_format)
    if cfg.max_examples:
        examples = examples[:cfg.max_examples]
    pad = pad_id_for(tokenizer)
    rows: list[dict] = []
    nll_sum, scored, read = 0.0, 0, 0
    start = time.perf_counter()
    for first in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[first:first + cfg.batch_size], pad)
        with session.use(spec.name if spec.adapter else None) as model:
            nll, count = token_nll(model, batch)  # (B,), (B,)
        for k in range(len(nll)):
            rows.append({"model": spec.name, "example": first + k, "tokens": int(count[k]), "nll": float(nll[k])})
        nll_sum += float(nll.sum())
        scored += int(count.sum())
        read += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return ModelResult(spec.name, spec.base, spec.adapter, 0, perplexity(nll_sum, scored), len(examples), seconds,
                       0.0, read, rows)


@torch.no_grad()
def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a right-padded batch: summed cross-entropy (natural log, float64) over its learned tokens, and
    their count. The output head runs only on learned positions, a chunk at a time (no (B, T, vocab) tensor)."""
    from loraforge.models import has_plain_head

    labels = batch["labels"]  # (B, T)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if has_plain_head(model):
        hidden = getattr(model, model.base_model_prefix)(**inputs).last_hidden_state[:, :-1][keep]  # (N, H)
        head = model.get_output_embeddings()
        chunks = [head(hidden[s:s + HEAD_CHUNK_ROWS]).float() for s in range(0, hidden.shape[0], HEAD_CHUNK_ROWS)]
        logits = torch.cat(chunks) if chunks else hidden.new_zeros((0, head.out_features))  # (N, V)
    else:
        logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
    nll = F.cross_entropy(logits, targets[keep], reduction="none").double()  # (N,)
    row_of = torch.arange(labels.shape[0])[:, None].expand_as(targets)[keep]  # (N,)
    per_row = torch.zeros(labels.shape[0], dtype=torch.float64).index_add_(0, row_of, nll)  # (B,)
    return per_row, keep.sum(dim=1)


def _write_results(result: EvalResult, path: Path) -> Path:
    cfg = result.config
    settings = {k: v for k, v in vars(cfg).items() if k not in ("data", "output")}
    data = {"data": cfg.data, "task": cfg.task, "recipe": result.recipe.name if result.recipe else None,
            "metric": result.recipe.metric if result.recipe and cfg.task == "generate" else "perplexity",
            "examples": len(result.examples) or (result.models[0].n if result.models else 0),
            "records": sum(len(ex.records) for ex in result.examples) or None,
            "few_shot_examples": [r.where for r in result.shots], "settings": settings,
            "models": [m.summary() for m in result.models]}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _write_predictions(result: EvalResult, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for model in result.models:
            for row in model.rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _finite(value: float) -> float | None:
    """NaN (undefined, e.g. NIST with no 5-gram) and inf (overflowed perplexity) are null in results.json."""
    return value if math.isfinite(value) else None
