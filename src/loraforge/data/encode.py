"""Records -> encoder inputs for a task head, and the label <-> id map saved beside the adapter.

| task | reads (default fields) | `EncodedExample.target` |
|---|---|---|
| seq-cls | text, label | [the label's id] |
| token-cls | tokens, ner_tags | the word's tag id on its first sub-token; -100 on the other sub-tokens and specials |

The tokenizer adds its own special tokens ([CLS] ... [SEP]) and cuts to `max_length`. NER tags are read as BIO:
IOB1 (CoNLL-2003 as released) is converted with `iob1_to_bio`, so predictions and references are what seqeval
expects. A Classification recipe (sst2, pubmedqa) or the Ner recipe (conll2003) may read the records instead:
then its columns, label names and checks apply.

`HeadSpec` is the task, the label names in id order and how records are read; `labels.json` in the adapter folder
holds it, with `id2label`/`label2id` as transformers names them, so the head can be rebuilt for `peft` with
`AutoModelForSequenceClassification.from_pretrained(base, num_labels=spec["num_labels"])`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraforge.data.example import Fields, check_columns
from loraforge.data.load import DataStats
from loraforge.data.ner import iob1_to_bio
from loraforge.data.readers import Record
from loraforge.data.recipes import RECIPES, Classification, Ner, Recipe, get_recipe
from loraforge.data.tokenize import IGNORE_INDEX
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SEQ_CLS, TOKEN_CLS = "seq-cls", "token-cls"
HEAD_TASKS = (SEQ_CLS, TOKEN_CLS)
PEFT_TASK_TYPES = {SEQ_CLS: "SEQ_CLS", TOKEN_CLS: "TOKEN_CLS"}
LABELS_FILE = "labels.json"
_FIELDS = {SEQ_CLS: ("text", "label"), TOKEN_CLS: ("tokens", "ner_tags")}
_RECIPE_KIND = {SEQ_CLS: Classification, TOKEN_CLS: Ner}


@dataclass(frozen=True)
class EncodedExample:
    """One record as encoder input ids, with what the head learns and what the metric compares against."""

    input_ids: list[int]
    target: list[int]
    """seq-cls: [the label id]; token-cls: one per input id (see the module table). All IGNORE_INDEX when the
    record has no label (prediction only)."""
    reference: str | list[str] | None
    """The label name, or the BIO tag of every word (cut-off words too); None when the record has no label."""
    word_starts: list[int] = field(default_factory=list)
    """token-cls: the position of each word's first sub-token; -1 for a word cut off by max_length."""
    truncated: bool = False
    where: str = ""
    """`file:line` of the record."""


@dataclass(frozen=True)
class HeadSpec:
    """A head's task, its label names (index = id) and how it reads records."""

    task: str
    labels: tuple[str, ...]
    recipe: str | None = None
    """A Classification recipe for seq-cls, the Ner recipe for token-cls, or None: fields as in the module table."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field name -> the record's, e.g. {"text": "sentence"}."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "columns", self.reader.columns)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise LoraforgeError(f"a {self.task} head needs two or more distinct labels, got {list(self.labels)}")

    @cached_property
    def reader(self) -> RecordReader:
        return RecordReader.of(self.task, self.recipe, self.columns)

    @classmethod
    def from_records(cls, task: str, records: Iterable[Record], *, labels: Sequence[str] | None = None,
                     recipe: str | None = None, columns: Mapping[str, str] | None = None,
                     skip_bad: bool = False) -> HeadSpec:
        """The spec for `records`; without `labels` the label set is the recipe's, else the one in the records
        (a bad record is an error, or passed over with `skip_bad`: `encode_all` counts it later)."""
        reader = RecordReader.of(task, recipe, columns)
        if labels is None and isinstance(reader.recipe, Classification):
            labels = reader.recipe.names
        if labels is None:
            seen: set[str] = set()
            for record in records:
                try:
                    value = reader.read(record)[1]
                except LoraforgeError:
                    if skip_bad:
                        continue
                    raise
                seen.update([value] if isinstance(value, str) else value)
            labels = _tag_order(seen) if task == TOKEN_CLS else sorted(seen)
        return cls(task, tuple(labels), recipe, reader.columns)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / LABELS_FILE
        data = {"task": self.task, "num_labels": len(self.labels),
                "id2label": {str(i): name for i, name in enumerate(self.labels)},
                "label2id": {name: i for i, name in enumerate(self.labels)},
                "recipe": self.recipe, "columns": self.columns}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> HeadSpec:
        path = Path(directory) / LABELS_FILE
        if not path.is_file():
            raise LoraforgeError(f"{path} not found: a seq-cls or token-cls adapter keeps its labels there "
                                 "(`loraforge train --task seq-cls|token-cls` writes it)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            id2label = data["id2label"]
            labels = tuple(id2label[str(i)] for i in range(len(id2label)))
            return cls(data["task"], labels, data.get("recipe"), dict(data.get("columns") or {}))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise LoraforgeError(f"{path}: not a labels file ({err!r}); it needs task and id2label "
                                 '{"0": name, "1": name, ...}') from None

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
               require_label: bool = True) -> EncodedExample:
        """The record as input ids and label ids; a label outside `labels` is an error naming file:line."""
        inputs, reference = self.reader.read(record, require_label=require_label)
        if reference is not None:
            self._check_labels(record, reference)
        ids = self.labels.index
        if self.task == SEQ_CLS:
            input_ids = list(tokenizer(inputs)["input_ids"])
            truncated = len(input_ids) > max_length
            if truncated:  # cut again through the tokenizer, so [SEP] stays at the end
                input_ids = list(tokenizer(inputs, truncation=True, max_length=max_length)["input_ids"])
            target = [IGNORE_INDEX if reference is None else ids(reference)]
            return EncodedExample(input_ids, target, reference, truncated=truncated, where=record.where)
        encoding = tokenizer(inputs, is_split_into_words=True, truncation=True, max_length=max_length)
        try:
            word_ids = encoding.word_ids()  # (T,): the word of each sub-token, None for [CLS]/[SEP]
        except ValueError:
            raise LoraforgeError(f"{type(tokenizer).__name__} cannot map sub-tokens to words; token-cls needs a fast "
                                 "tokenizer (a model folder with tokenizer.json)") from None
        starts = [-1] * len(inputs)
        target = [IGNORE_INDEX] * len(word_ids)
        for position, word in enumerate(word_ids):
            if word is not None and starts[word] == -1:
                starts[word] = position
                target[position] = IGNORE_INDEX if reference is None else ids(reference[word])
        return EncodedExample(list(encoding["input_ids"]), target, reference, starts,
                              truncated=-1 in starts, where=record.where)

    def encode_all(self, records: Iterable[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   on_bad_record: str = "error") -> tuple[list[EncodedExample], DataStats]:
        """Encode labelled records for training; `on_bad_record="skip"` counts bad ones instead of stopping."""
        examples, stats = [], DataStats()
        for record in records:
            stats.records_read += 1
            try:
                example = self.encode(record, tokenizer, max_length)
            except LoraforgeError as err:
                stats.skip(err, on_bad_record)
                continue
            examples.append(example)
            stats.use(example.truncated, len(example.input_ids), sum(t != IGNORE_INDEX for t in example.target))
        stats.formats = {self.task: stats.used}
        return examples, stats

    def _check_labels(self, record: Record, reference: str | list[str]) -> None:
        for name in [reference] if isinstance(reference, str) else reference:
            if name not in self.labels:
                raise LoraforgeError(
                    f'{record.where}: field "{self.reader.label_field}" has label {name!r}, which this {self.task} '
                    f"head does not know; allowed labels: {', '.join(self.labels)}. Fix the record, or train with "
                    "labels that include it (--labels)")


@dataclass(frozen=True)
class RecordReader:
    """Reads (text, label) or (words, BIO tags) from records: through a recipe, or from the fields in `_FIELDS`."""

    task: str
    recipe: Recipe | None
    columns: dict[str, str]

    @classmethod
    def of(cls, task: str, recipe: str | None, columns: Mapping[str, str] | None) -> RecordReader:
        if task not in HEAD_TASKS:
            raise LoraforgeError(f"task {task!r} has no head; choose one of: {', '.join(HEAD_TASKS)}")
        if recipe is None:
            return cls(task, None, check_columns(columns, _FIELDS[task], f"task {task}"))
        kind = _RECIPE_KIND[task]
        if not isinstance(get_recipe(recipe), kind):
            usable = ", ".join(name for name, r in RECIPES.items() if isinstance(r, kind))
            raise LoraforgeError(f"recipe {recipe!r} cannot feed a {task} head; use one of: {usable}, or no recipe "
                                 "(fields " + " and ".join(_FIELDS[task]) + ", renamed by columns)")
        reader = get_recipe(recipe).with_columns(columns)
        return cls(task, reader, dict(columns or {}))

    @property
    def label_field(self) -> str:
        """The record's own name of the label field (for stratified few-shot sampling and error messages)."""
        ours = _FIELDS[self.task][1]
        return (self.recipe.columns if self.recipe else self.columns).get(ours, ours)

    def read(self, record: Record, *, require_label: bool = True) -> tuple[str | list[str], str | list[str] | None]:
        """(text, label name) or (words, BIO tags); the label is None when absent and `require_label` is False."""
        has_label = self.label_field in record.fields
        r = self.recipe
        if self.task == SEQ_CLS:
            if r is not None:
                return r.prompt(record)[1], r.target(record) if has_label or require_label else None
            f = self._fields(record)
            text = f.text("text").strip()
            if not has_label and not require_label:
                return text, None
            value = f.value("label")
            if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                raise f.error("label", f"is {value!r}", "give each record one label, a string or a whole number")
            return text, str(value).strip()
        if r is not None:
            if not has_label and not require_label:
                return _checked_words(r.fields(record)), None
            return r.sentence(record)[0], r.reference(record)
        f = self._fields(record)
        words = _checked_words(f)
        if not has_label and not require_label:
            return words, None
        tags = f.array("ner_tags")
        if not all(isinstance(t, str) and t for t in tags):
            raise f.error("ner_tags", "holds an empty or non-string tag", 'tags must be strings such as "O", "B-PER"')
        if len(tags) != len(words):
            raise f.error("ner_tags", f"has {len(tags)} tags for {len(words)} tokens", "give one tag per token")
        if all(t == "O" or t[:2] in ("B-", "I-") for t in tags):
            return words, iob1_to_bio(tags)  # BIO stays BIO; IOB1 becomes BIO
        return words, tags

    def _fields(self, record: Record) -> Fields:
        text, label = (self.columns.get(k, k) for k in _FIELDS[self.task])
        return Fields(record, f'{self.task} records need "{text}" and "{label}" (rename with columns=...)',
                      self.columns)


def _checked_words(f: Fields) -> list[str]:
    words = f.array("tokens")
    if not all(isinstance(w, str) and w for w in words):
        raise f.error("tokens", "holds an empty or non-string token", "each token must be a non-empty string")
    return words


def collate_head(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels`: (B,) for seq-cls, (B, T) padded with -100 for
    token-cls."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    per_token = bool(batch[0].word_starts)  # token-cls: every sentence has a word
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if per_token \
        else torch.tensor([e.target[0] for e in batch], dtype=torch.long)  # (B, T) or (B,)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        if per_token:
            labels[row, :n] = torch.tensor(example.target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tag_order(seen: Iterable[str]) -> tuple[str, ...]:
    """O first, then per entity type B- and I- (both, even if only one was seen), then other tags, sorted."""
    tags, types, other = set(seen), set(), set()
    for tag in tags:
        if tag[:2] in ("B-", "I-") and len(tag) > 2:
            types.add(tag[2:])
        elif tag != "O":
            other.add(tag)
    ordered = ["O"] if "O" in tags or types else []
    ordered += [f"{prefix}-{kind}" for kind in sorted(types) for prefix in ("B", "I")]
    return tuple(ordered + sorted(other))

