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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.config import DEFAULT_MODEL, adapter_quantize
from loraforge.data import Record, Recipe, collate, load_examples, make_recipe, pad_id_for, read_records
from loraforge.errors import LoraforgeError
from loraforge.eval.config import EvalConfig
from loraforge.eval.fewshot import encode_few_shot, pick_shots
from loraforge.eval.report import write_report
from loraforge.eval.results import EvalExample, EvalResult, ModelResult
from loraforge.infer.batch import BatchOptions, generate_batch
from loraforge.infer.predict import score_recipe
from loraforge.infer.score import score_label_words, token_nll
from loraforge.infer.session import InferenceSession
from loraforge.metrics import MULTI_REFERENCE_METRICS, perplexity

log = logging.getLogger("loraforge")

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
    """The rows: the base (unless `cfg.base` is false), the base with K shots (if asked), then each adapter on its
    base."""
    from loraforge.models import adapter_base

    adapter_bases = [cfg.model or adapter_base(a) or DEFAULT_MODEL for a in cfg.adapters]
    base = cfg.model or (adapter_bases[0] if adapter_bases else DEFAULT_MODEL)
    specs = [ModelSpec("base", base)] if cfg.base else []
    if cfg.few_shot:
        specs.append(ModelSpec(f"base {cfg.few_shot}-shot", base, few_shot=cfg.few_shot))
    names = {"base"} | {spec.name for spec in specs}
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
    result.files = write_outputs(result, output)
    return result


def write_outputs(result: EvalResult, output: Path) -> dict[str, Path]:
    """results.json, predictions.jsonl and the report (report.md, report.html, plots) of `result` in `output`."""
    files = {"results": _write_results(result, output / "results.json"),
             "predictions": _write_predictions(result, output / "predictions.jsonl")}
    files.update(write_report(result, output))
    return files


def _sessions(specs: list[ModelSpec], cfg: EvalConfig) -> Iterator[tuple[ModelSpec, InferenceSession, float]]:
    """Each spec with the session of its base (one per base, loaded once) and its load time: the base's for the
    first row on it, the adapter's own read-and-add time for an adapter row."""
    session: InferenceSession | None = None
    for spec in specs:
        start = time.perf_counter()
        if session is None or session.base != spec.base:
            session = None  # free the previous base before loading the next one
            session = InferenceSession.open(spec.base, dtype=cfg.dtype, device=cfg.device,
                                            quantize=cfg.quantize or adapter_quantize(list(cfg.adapters)))
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
        new_ids, probabilities = score_label_words(session, spec.name if spec.adapter else None, recipe,
                                                   [ex.record for ex in examples], prompts, cfg.batch_size)
    else:
        new_ids = generate_batch(session, prompts, options, spec.name if spec.adapter else None)
    seconds = time.perf_counter() - start
    metrics, rows = score_outputs(spec.name, recipe, examples, new_ids, tokenizer)
    for row, prompt, probs in zip(rows, prompts, probabilities):
        row["prompt_tokens"] = len(prompt)
        if probs:
            row["probabilities"] = probs
    return ModelResult(name=spec.name, base=spec.base, adapter=spec.adapter, few_shot=spec.few_shot, metrics=metrics,
                       n=len(examples), seconds=seconds, tokens=sum(len(ids) for ids in new_ids), rows=rows)


def score_outputs(model: str, recipe: Recipe, examples: list[EvalExample], new_ids: list[list[int]], tokenizer
                  ) -> tuple[dict[str, float], list[dict]]:
    """The recipe's metrics over generated `new_ids` (one list per example) and one predictions.jsonl row each:
    the text, what the recipe parsed from it, the input and the references."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    parsed = [recipe.parse_prediction(text, ex.record) for text, ex in zip(texts, examples)]
    metrics = score_recipe(recipe, parsed, [ex.references for ex in examples])
    rows = [{"model": model, "example": i, "where": ex.record.where, "input": recipe.prompt(ex.record)[1],
             "references": ex.references, "output": text, "parsed": p}
            for i, (ex, text, p) in enumerate(zip(examples, texts, parsed))]
    return metrics, rows


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
    return ModelResult(name=spec.name, base=spec.base, adapter=spec.adapter, few_shot=0,
                       metrics=perplexity(nll_sum, scored), n=len(examples), seconds=seconds, tokens=read, rows=rows)


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
