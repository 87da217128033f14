"""Predictions for a data file, scored by the task's metric: an encoder's task head, or a decoder's answers.

| path | model | prediction | reference | metric |
|---|---|---|---|---|
| seq-cls head | encoder + adapter with labels.json | a label name | the record's label | accuracy_macro_f1 |
| token-cls head | encoder + adapter with labels.json | one BIO tag per word | the record's BIO tags | seqeval |
| recipe | decoder (+ adapter) | `recipe.parse_prediction` of the greedy answer | `recipe.reference` | the recipe's |
| label words | decoder (+ adapter), classification recipe | the label whose words are likeliest | `recipe.reference` | accuracy_macro_f1 |

A head predicts from the argmax of its logits; a token-cls word takes the tag of its first sub-token, and a word cut
off by max_length gets "O", so every sentence has one tag per word and seqeval can score it. A decoder generates
greedily from `recipe.encode_prompt` through the engine (`infer.batch`), or, with `answer="label-words"`, scores each
label's words after the prompt (`infer.score`). Both load through `InferenceSession`.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loraforge.config import DEFAULT_MODEL, RECIPE_OPTIONS, with_adapter_recipe
from loraforge.data import Record, make_recipe, pad_id_for, read_records
from loraforge.data.encode import HEAD_TASKS, LABELS_FILE, HeadSpec
from loraforge.data.recipes import Classification, Recipe
from loraforge.errors import LoraforgeError
from loraforge.heads import run_head, score_head
from loraforge.infer.batch import BatchOptions, generate_batch
from loraforge.infer.score import check_answer, check_label_words, score_label_words
from loraforge.infer.session import InferenceSession
from loraforge.lora import read_adapter_config
from loraforge.metrics import get_metric
from loraforge.models import adapter_base, architecture_kind

log = logging.getLogger("loraforge")


@dataclass(frozen=True)
class Prediction:
    """One record's prediction, its reference (None when the record has none) and, for a decoder, the raw answer."""

    where: str
    prediction: Any
    reference: Any = None
    generated: str | None = None
    probabilities: dict[str, float] | list[float] | None = None
    """Every label's probability (a seq-cls head, or label words), or each chosen tag's (a token-cls head)."""

    def to_json(self) -> dict[str, Any]:
        row = {"where": self.where, "prediction": self.prediction}
        for name in ("probabilities", "reference", "generated"):
            if getattr(self, name) is not None:
                row[name] = getattr(self, name)
        return row


# ---- encoder heads ------------------------------------------------------------------------------------------------
def predict_head(session: InferenceSession, adapter: str, spec: HeadSpec, records: Iterable[Record], *,
                 max_length: int = 512, batch_size: int = 16) -> list[Prediction]:
    """One prediction per record by head adapter `adapter` (a record without a label gets reference None)."""
    tokenizer = session.tokenizer
    examples = [spec.encode(r, tokenizer, max_length, require_label=False) for r in records]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        log.warning("%d of %d records were cut to max_length=%d tokens%s", truncated, len(examples), max_length,
                    "; words past it are tagged O" if spec.task == "token-cls" else "")
    with session.use(adapter) as model:
        out = run_head(model, examples, spec, pad_id_for(tokenizer), batch_size)
    return [Prediction(e.where, p, e.reference, probabilities=probs)
            for e, p, probs in zip(examples, out.predictions, out.probabilities)]


# ---- decoders: generate, then parse -------------------------------------------------------------------------------
def predict_generative(session: InferenceSession, recipe: Recipe, records: Iterable[Record], *,
                       adapter: str | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                       answer: str = "generate") -> list[Prediction]:
    """Greedy answers on `adapter` (None: the base) from `recipe.encode_prompt`, decoded by the engine
    (`batch.generate_batch`), parsed by `recipe.parse_prediction`. `answer="label-words"` (a classification recipe):
    the label whose words are likeliest after the prompt instead (`score.score_label_words`), with every label's
    probability."""
    tokenizer = session.tokenizer
    if recipe.chunked:
        raise LoraforgeError(f"recipe {recipe.name} has no answers to predict (it is scored by {recipe.metric}); "
                             "give a task recipe such as sst2, conll2003, squad or e2e")
    if answer == "label-words":
        check_label_words(recipe)
    records = list(records)
    prompts = [recipe.encode_prompt(r, tokenizer) for r in records]
    probabilities: list[dict[str, float] | None] = [None] * len(records)
    if answer == "label-words":
        outputs, probabilities = score_label_words(session, adapter, recipe, records, prompts, batch_size)
    else:
        outputs = generate_batch(session, prompts, BatchOptions(max_new_tokens=max_new_tokens,
                                                                batch_size=batch_size), adapter)
    out: list[Prediction] = []
    for record, ids, probs in zip(records, outputs, probabilities):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(Prediction(record.where, recipe.parse_prediction(text, record), _reference(recipe, record), text,
                              probs))
    return out


def _reference(recipe: Recipe, record: Record) -> Any:
    """The recipe's reference, or None when the record lacks a field (the prompt's fields were read already)."""
    try:
        return recipe.reference(record)
    except LoraforgeError:
        if all(recipe.columns.get(k, k) in record.fields for k in recipe.FIELDS):
            raise  # the field is there but wrong: say so
        return None


def score_recipe(recipe: Recipe, predictions: list, references: list) -> dict[str, float]:
    """The recipe's metric; a Classification recipe's answers outside its label names count as invalid."""
    metric = get_metric(recipe.metric)
    if recipe.metric == "accuracy_macro_f1" and isinstance(recipe, Classification):
        return metric(predictions, references, labels=recipe.names)
    return metric(predictions, references)


# ---- one call for the CLI -----------------------------------------------------------------------------------------
@dataclass
class PredictResult:
    predictions: list[Prediction]
    scores: dict[str, float] | None
    """The metric over the records that have a reference; None when none has."""
    metric: str
    scored: int


def predict_file(data: str | Path, *, model: str | None = None, adapter: str | Path | None = None,
                 recipe: str | None = None, task: str | None = None, columns: Mapping[str, str] | None = None,
                 metric: str | None = None, instruction: str | None = None, file_format: str | None = None,
                 max_examples: int = 0, batch_size: int = 16,
                 max_length: int = 512, max_new_tokens: int = 64, answer: str = "generate",
                 output: str | Path | None = None, dtype: str = "float32", device: str = "cpu",
                 quantize: str | None = None) -> PredictResult:
    """Predict every record of `data` (or its first `max_examples`), write them as JSON lines, and score them.

    With an adapter that has labels.json (or `task` seq-cls/token-cls): the encoder-head path; `recipe` and
    `columns` then override how its records are read. Otherwise the decoder path, with `recipe` (and `columns`,
    `metric`, `instruction`) as given or as the adapter was trained with.
    """
    if task is not None and task not in (*HEAD_TASKS, "causal-lm"):
        raise LoraforgeError(f"--task {task}: choose one of seq-cls, token-cls, causal-lm")
    limits = {"max_examples": (max_examples, 0), "batch_size": (batch_size, 1), "max_length": (max_length, 2),
              "max_new_tokens": (max_new_tokens, 1)}
    for name, (value, least) in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be a whole number >= {least}, got {value!r}")
    check_answer(answer)
    is_head = task in HEAD_TASKS or (task is None and adapter is not None and (Path(adapter) / LABELS_FILE).is_file())
    if is_head:
        if adapter is None:
            raise LoraforgeError(f"--task {task} predicts with a trained head: give --adapter DIR (the output of "
                                 f"loraforge train --task {task})")
        _check_head(adapter, task)
    else:  # a decoder: the recipe as given, or as the adapter was trained with
        declared = with_adapter_recipe(dict(zip(RECIPE_OPTIONS, (recipe, columns, metric, instruction))), adapter)
        recipe, columns, metric, instruction = (declared[k] for k in RECIPE_OPTIONS)
        if recipe is None:
            raise LoraforgeError("predict needs --recipe R for a decoder (e.g. sst2, conll2003, squad, e2e, "
                                 "text2text), an adapter trained with one, or an adapter trained with --task "
                                 "seq-cls|token-cls")
        _check_decoder(model, adapter, recipe)
    records = read_records(data, file_format)
    if max_examples:
        records = itertools.islice(records, max_examples)
    session = InferenceSession.open(model, {"adapter": adapter} if adapter else {}, dtype=dtype, device=device,
                                    quantize=quantize)
    if is_head:
        spec = session.head
        if recipe is not None or columns:
            spec = HeadSpec(spec.task, spec.labels, recipe or spec.recipe, dict(columns or spec.columns))
        predictions = predict_head(session, "adapter", spec, records, max_length=max_length, batch_size=batch_size)
        metric = "accuracy_macro_f1" if spec.task == "seq-cls" else "seqeval"
        scorer = partial(score_head, spec)
    else:
        chosen = make_recipe(recipe, columns, metric, instruction)
        predictions = predict_generative(session, chosen, records, adapter="adapter" if adapter else None,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, answer=answer)
        metric, scorer = chosen.metric, partial(score_recipe, chosen)
    if not predictions:
        raise LoraforgeError(f"{data}: no records to predict")
    if output is not None:
        write_predictions(predictions, output)
    scored = [p for p in predictions if p.reference is not None]
    scores = scorer([p.prediction for p in scored], [p.reference for p in scored]) if scored else None
    return PredictResult(predictions, scores, metric, len(scored))


def _check_head(adapter: str | Path, task: str | None) -> None:
    """A LoraforgeError unless `adapter` is a head adapter (of `task`, if given)."""
    config = read_adapter_config(adapter)
    if not (Path(adapter) / LABELS_FILE).is_file():
        raise LoraforgeError(
            f"adapter {adapter} has task_type {config.task_type} and no {LABELS_FILE}, so it is not a seq-cls or "
            "token-cls head; predict with a decoder and --recipe R, or give an adapter trained with --task "
            "seq-cls|token-cls")
    spec = HeadSpec.load(adapter)
    if task is not None and task != spec.task:
        raise LoraforgeError(f"--task {task}, but adapter {adapter} is a {spec.task} head ({LABELS_FILE})")


def _check_decoder(model: str | None, adapter: str | Path | None, recipe: str) -> None:
    """A LoraforgeError that says which path fits when the base is not a decoder."""
    name = model or (adapter_base(adapter) if adapter else None) or DEFAULT_MODEL
    kind = architecture_kind(name)
    if kind != "decoder":
        not_head = f", and adapter {adapter} has no {LABELS_FILE}, so it is no seq-cls/token-cls head" \
            if adapter else ""
        raise LoraforgeError(f"'{name}' is an {kind}: it cannot write answers for recipe {recipe}{not_head}. Train a "
                             "head on it with --task seq-cls|token-cls and predict with that adapter, or use a "
                             "decoder model")


def write_predictions(predictions: list[Prediction], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in predictions:
            fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    return path
