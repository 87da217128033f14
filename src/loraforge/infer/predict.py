"""Predictions for a data file, scored by the task's metric: an encoder's task head, or a decoder's answers.

| path | model | prediction | reference | metric |
|---|---|---|---|---|
| seq-cls head | encoder + adapter with labels.json | a label name | the record's label | accuracy_macro_f1 |
| token-cls head | encoder + adapter with labels.json | one BIO tag per word | the record's BIO tags | seqeval |
| recipe | decoder (+ adapter) | `recipe.parse_prediction` of the greedy answer | `recipe.reference` | the recipe's |

A head predicts from the argmax of its logits; a token-cls word takes the tag of its first sub-token, and a word cut
off by max_length gets "O", so every sentence has one tag per word and seqeval can score it. A decoder generates
greedily from `recipe.encode_prompt` in left-padded batches (`infer.batch`).
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

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.data import IGNORE_INDEX, Record, get_recipe, pad_id_for, read_records
from loraforge.data.encode import (
    HEAD_TASKS,
    LABELS_FILE,
    PEFT_TASK_TYPES,
    EncodedExample,
    HeadSpec,
    collate_head,
)
from loraforge.data.recipes import Classification, Recipe
from loraforge.errors import LoraforgeError
from loraforge.metrics import accuracy_macro_f1, entity_f1, get_metric
from loraforge.infer.batch import BatchOptions, generate_batch
from loraforge.lora import LoraModel, load_adapter, read_adapter_config
from loraforge.models import BUILTIN_MODELS, load_model, resolve_model

log = logging.getLogger("loraforge")


@dataclass(frozen=True)
class Prediction:
    """One record's prediction, its reference (None when the record has none) and, for a decoder, the raw answer."""

    where: str
    prediction: Any
    reference: Any = None
    generated: str | None = None

    def to_json(self) -> dict[str, Any]:
        row = {"where": self.where, "prediction": self.prediction}
        if self.reference is not None:
            row["reference"] = self.reference
        if self.generated is not None:
            row["generated"] = self.generated
        return row


# ---- which models fit which path ----------------------------------------------------------------------------------
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


# ---- encoder heads ------------------------------------------------------------------------------------------------
def load_encoder_with_head(name_or_path: str, task: str, num_labels: int, dtype: torch.dtype = torch.float32):
    """`load_model` for a head, without transformers' report that the head is new (it is: we train or load it)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_model(name_or_path, kind=task, dtype=dtype, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_head(model: str | None, adapter: str | Path, *, task: str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[LoraModel, Any, HeadSpec]:
    """An encoder with its head and the adapter in `adapter` (a seq-cls/token-cls run's output folder)."""
    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    if not (adapter / LABELS_FILE).is_file():
        raise LoraforgeError(
            f"adapter {adapter} has task_type {config.task_type} and no {LABELS_FILE}, so it is not a seq-cls or "
            "token-cls head; predict with a decoder and --recipe R, or give an adapter trained with --task "
            "seq-cls|token-cls")
    spec = HeadSpec.load(adapter)
    if task is not None and task != spec.task:
        raise LoraforgeError(f"--task {task}, but adapter {adapter} is a {spec.task} head ({LABELS_FILE})")
    if config.task_type != PEFT_TASK_TYPES[spec.task]:
        raise LoraforgeError(f"adapter {adapter}: task_type is {config.task_type} in adapter_config.json, but its "
                             f"{LABELS_FILE} says {spec.task}; the two files come from different runs")
    model = model or config.base_model_name_or_path
    if not model:
        raise LoraforgeError(f"adapter {adapter} does not name its base model; give --model")
    require_encoder(model, spec.task)
    base, tokenizer = load_encoder_with_head(model, spec.task, len(spec.labels), dtype)
    lm = load_adapter(base, adapter)
    lm.model.eval()  # the injected LoRA layers are new modules, in train mode (dropout on) until told otherwise
    return lm, tokenizer, spec


@torch.no_grad()
def run_head(model: nn.Module, examples: list[EncodedExample], spec: HeadSpec, pad_id: int,
             batch_size: int = 16) -> tuple[list[str | list[str]], float, int]:
    """(predictions, summed cross-entropy, labelled count) over `examples`, in eval mode; the loss counts
    examples (seq-cls) or words (token-cls) whose label is known."""
    was_training = model.training
    model.eval()
    predictions: list[str | list[str]] = []
    loss_sum, count = 0.0, 0
    outside = "O" if "O" in spec.labels else spec.labels[0]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate_head(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # (B, K) for seq-cls, (B, T, K) for token-cls
        labels = batch["labels"]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="sum").nan_to_num().item()
        count += int((labels != IGNORE_INDEX).sum())
        best = logits.argmax(-1).tolist()  # (B,) or (B, T)
        for row, example in enumerate(chunk):
            if spec.task == "seq-cls":
                predictions.append(spec.labels[best[row]])
            else:
                predictions.append([spec.labels[best[row][p]] if p >= 0 else outside for p in example.word_starts])
    model.train(was_training)
    return predictions, loss_sum, count


def score_head(spec: HeadSpec, predictions: list, references: list) -> dict[str, float]:
    """accuracy_macro_f1 over the head's labels (seq-cls), or seqeval's entity F1 (token-cls)."""
    if spec.task == "seq-cls":
        return accuracy_macro_f1(predictions, references, labels=list(spec.labels))
    return entity_f1(predictions, references)


def predict_head(lm: LoraModel, tokenizer, spec: HeadSpec, records: Iterable[Record], *, max_length: int = 512,
                 batch_size: int = 16) -> list[Prediction]:
    """One prediction per record (a record without a label is predicted, with reference None)."""
    examples = [spec.encode(r, tokenizer, max_length, require_label=False) for r in records]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        log.warning("%d of %d records were cut to max_length=%d tokens%s", truncated, len(examples), max_length,
                    "; words past it are tagged O" if spec.task == "token-cls" else "")
    predictions, _, _ = run_head(lm.model, examples, spec, pad_id_for(tokenizer), batch_size)
    return [Prediction(e.where, p, e.reference) for e, p in zip(examples, predictions)]


# ---- decoders: generate, then parse -------------------------------------------------------------------------------
def predict_generative(model: nn.Module, tokenizer, recipe: Recipe, records: Iterable[Record], *,
                       max_new_tokens: int = 64, batch_size: int = 8) -> list[Prediction]:
    """Greedy answers from `recipe.encode_prompt` (left-padded batches, `batch.generate_batch`), parsed by
    `recipe.parse_prediction`."""
    if recipe.chunked:
        raise LoraforgeError(f"recipe {recipe.name} has no answers to predict (it is scored by {recipe.metric}); "
                             "give a task recipe such as sst2, conll2003, squad or e2e")
    records = list(records)
    prompts = [recipe.encode_prompt(r, tokenizer) for r in records]
    outputs = generate_batch(model, tokenizer, prompts, BatchOptions(max_new_tokens=max_new_tokens,
                                                                     batch_size=batch_size))
    out: list[Prediction] = []
    for record, ids in zip(records, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(Prediction(record.where, recipe.parse_prediction(text, record), _reference(recipe, record), text))
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
                 file_format: str | None = None, max_examples: int = 0, batch_size: int = 16,
                 max_length: int = 512, max_new_tokens: int = 64, output: str | Path | None = None) -> PredictResult:
    """Predict every record of `data` (or its first `max_examples`), write them as JSON lines, and score them.

    With an adapter that has labels.json (or `task` seq-cls/token-cls): the encoder-head path; `recipe` and
    `columns` then override how its records are read. Otherwise `recipe` is required: the decoder path.
    """
    if task is not None and task not in (*HEAD_TASKS, "causal-lm"):
        raise LoraforgeError(f"--task {task}: choose one of seq-cls, token-cls, causal-lm")
    limits = {"max_examples": (max_examples, 0), "batch_size": (batch_size, 1), "max_length": (max_length, 2),
              "max_new_tokens": (max_new_tokens, 1)}
    for name, (value, least) in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LoraforgeError(f"--{name.replace('_', '-')} must be a whole number >= {least}, got {value!r}")
    is_head = task in HEAD_TASKS or (task is None and adapter is not None and (Path(adapter) / LABELS_FILE).is_file())
    records = read_records(data, file_format)
    if max_examples:
        records = itertools.islice(records, max_examples)
    if is_head:
        if adapter is None:
            raise LoraforgeError(f"--task {task} predicts with a trained head: give --adapter DIR (the output of "
                                 f"loraforge train --task {task})")
        lm, tokenizer, spec = load_head(model, adapter, task=task)
        if recipe is not None or columns:
            spec = HeadSpec(spec.task, spec.labels, recipe or spec.recipe, dict(columns or spec.columns))
        predictions = predict_head(lm, tokenizer, spec, records, max_length=max_length, batch_size=batch_size)
        metric = "accuracy_macro_f1" if spec.task == "seq-cls" else "seqeval"
        scorer = partial(score_head, spec)
    else:
        chosen, base, tokenizer = _load_decoder(model, adapter, recipe, columns)
        predictions = predict_generative(base, tokenizer, chosen, records, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size)
        metric, scorer = chosen.metric, partial(score_recipe, chosen)
    if not predictions:
        raise LoraforgeError(f"{data}: no records to predict")
    if output is not None:
        write_predictions(predictions, output)
    scored = [p for p in predictions if p.reference is not None]
    scores = scorer([p.prediction for p in scored], [p.reference for p in scored]) if scored else None
    return PredictResult(predictions, scores, metric, len(scored))


def _load_decoder(model: str | None, adapter: str | Path | None, recipe: str | None,
                  columns: Mapping[str, str] | None) -> tuple[Recipe, nn.Module, Any]:
    """The recipe and a decoder (with the adapter, if any), or an error saying which path fits instead."""
    if recipe is None:
        raise LoraforgeError("predict needs --recipe R for a decoder (e.g. sst2, conll2003, squad, e2e), or an "
                             "adapter trained with --task seq-cls|token-cls")
    chosen = get_recipe(recipe).with_columns(columns)
    name = model or (read_adapter_config(adapter).base_model_name_or_path if adapter else None)
    if not name:
        raise LoraforgeError(f"adapter {adapter} does not name its base model; give --model")
    kind = architecture_kind(name)
    if kind != "decoder":
        not_head = f", and adapter {adapter} has no {LABELS_FILE}, so it is no seq-cls/token-cls head" \
            if adapter else ""
        raise LoraforgeError(f"'{name}' is an {kind}: it cannot write answers for recipe {recipe}{not_head}. Train a "
                             "head on it with --task seq-cls|token-cls and predict with that adapter, or use a "
                             "decoder model")
    base, tokenizer = load_model(name)
    if adapter:
        load_adapter(base, adapter)
    return chosen, base, tokenizer


def write_predictions(predictions: list[Prediction], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in predictions:
            fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    return path
