"""Task recipes: how a record of a known task becomes a prompt, what the model learns to answer, and how an answer
the model generates is read back for the task's metric.

| recipe | reads (default columns) | learns | metric | `parse_prediction` gives |
|---|---|---|---|---|
| sst2 | sentence, label (0/1) | "negative" / "positive" | accuracy_macro_f1 | a label name ("" if none) |
| pubmedqa | question, context, label | "yes" / "no" / "maybe" | pubmedqa (accuracy, macro-F1) | a label name |
| conll2003 | tokens, ner_tags (IOB1 or BIO) | "EU: ORG; German: MISC" | seqeval | one BIO tag per token |
| dialogsum, scitldr | dialogue/source, summary/target | the (first) summary | rouge | the first paragraph |
| squad, cmrc2018 | context, question, answers | the first answer | squad_em_f1, squad_zh_em_f1 | the first line |
| e2e | mr, ref | the reference, whitespace collapsed | bleu_nist | the first line |
| lm | text | all of it, chunked | perplexity | the text |
| text2text | input (one column, or several joined by "+"), output | the (first) output | --metric (token_f1) | the first paragraph |

`text2text` is your own task declared from columns and a metric, in YAML or flags, e.g.
`--recipe text2text --columns input=question,output=answer --metric exact_match --instruction "Answer briefly."`:
`make_recipe` builds it (and gives any text recipe another metric or instruction), and the adapter's
train_config.yaml keeps the declaration, so `eval` and `predict` score its generated answers without repeating it.

`reference(record)` gives what a parsed prediction is scored against: the label name, the BIO tags, or the list of
reference texts. How a prompt is written is the recipe's `prompt_style`:
- "instruction" (all but e2e): `render_prompt` (the chat template when the tokenizer has one, else Alpaca), with
  the recipe's instruction as the instruction and the record's text as the input;
- "plain" (e2e): the record's input alone and a newline, the target after it, then EOS, as text: no instruction,
  no roles, no system prompt (the LoRA paper's E2E format). The adapter learns the task from its data, and an
  E2E example is 64 SmolLM2 tokens instead of 107 with the chat template: 1.7x the examples per training second.

Change a recipe with `dataclasses.replace(RECIPES["sst2"], labels={...})` (or `prompt_style="instruction"`) or
`recipe.with_columns({...})`; pass the result to `load_examples(..., recipe=...)`. Feed `parse_prediction` the
generated continuation decoded without special tokens.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from loraforge.data.example import Example, Fields, check_columns
from loraforge.data.formats import make_instruction_example
from loraforge.data.ner import parse_entities, render_entities, spans_to_bio, tag_problem, tag_spans
from loraforge.data.readers import Record
from loraforge.data.tokenize import IGNORE_INDEX, prompt_ids, tokenize_example
from loraforge.errors import LoraforgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_STYLES = ("instruction", "plain")
"""How a recipe writes its prompts (`Recipe.prompt_style`)."""

METRICS = (
    "accuracy_macro_f1", "pubmedqa", "seqeval", "rouge", "bleu_nist", "squad_em_f1", "squad_zh_em_f1", "perplexity",
    "token_f1",
)
"""The metric names the built-in recipes use (`loraforge.metrics.get_metric` resolves each)."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A task: prompt, target, reference and parser for records with the fields in `FIELDS` (renamed by `columns`)."""

    name: str
    instruction: str
    """The task instruction at the top of every prompt."""
    columns: Mapping[str, str] = field(default_factory=dict)
    """Our field name -> the record's, e.g. {"text": "sentence"}; unmapped names are read as they are."""
    metric: str = ""
    """The name of the metric that scores it (one of `METRICS`)."""
    prompt_style: str = "instruction"
    """"instruction" (`render_prompt`: chat template or Alpaca) or "plain" (the input and a newline; see above)."""

    FIELDS: ClassVar[tuple[str, ...]] = ()
    chunked: ClassVar[bool] = False
    """True when `load_examples` makes the examples by chunking a token stream instead of one per record."""

    def prompt(self, record: Record) -> tuple[str, str]:
        """(instruction, input) for `render_prompt`."""
        raise NotImplementedError

    def target(self, record: Record) -> str:
        """The text the model learns to write."""
        raise NotImplementedError

    def reference(self, record: Record) -> Any:
        """What the metric compares a parsed prediction with."""
        raise NotImplementedError

    def parse_prediction(self, text: str, record: Record) -> Any:
        """Turn generated text into what the metric scores; `parse_prediction(target(r), r)` matches `reference(r)`."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise LoraforgeError(f'{self.name}: prompt_style is "{self.prompt_style}"; use one of {PROMPT_STYLES}')

    def to_example(self, record: Record, tokenizer: PreTrainedTokenizerBase | None = None) -> Example:
        """The training example: the prompt read, the target (and end-of-turn or EOS) learned."""
        return self._example(record, self.target(record), tokenizer)

    def encode_prompt(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The prompt ids exactly as in training, to generate an answer from."""
        return prompt_ids(self._example(record, "", tokenizer), tokenizer)

    def answer_ids(self, record: Record, answer: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The ids training learns after `encode_prompt(record)` when the target is `answer`: its tokens and the
        end-of-turn or EOS that closes it."""
        taught = tokenize_example(self._example(record, answer, tokenizer), tokenizer, 10**9)
        return [t for t in taught.labels if t != IGNORE_INDEX]

    def plain_prompt(self, record: Record) -> str:
        """The prompt text of the "plain" style: the input (the instruction if there is none) and a newline."""
        instruction, input_ = self.prompt(record)
        return (input_ if input_.strip() else instruction) + "\n"

    def _example(self, record: Record, target: str, tokenizer: PreTrainedTokenizerBase | None) -> Example:
        if self.prompt_style == "plain":
            return Example.from_prompt(self.plain_prompt(record), target)
        instruction, input_ = self.prompt(record)
        return make_instruction_example(instruction, input_, target, tokenizer)

    def with_columns(self, columns: Mapping[str, str] | None) -> Recipe:
        """This recipe reading its fields from other columns (merged over the recipe's own mapping)."""
        columns = check_columns(columns, self.FIELDS, f"the {self.name} recipe")
        return replace(self, columns={**self.columns, **columns}) if columns else self

    def fields(self, record: Record) -> Fields:
        names = ", ".join(f'"{self.columns.get(k, k)}"' for k in self.FIELDS)
        return Fields(record, f"the {self.name} recipe reads {names} (rename with columns=...)", self.columns)


@dataclass(frozen=True, kw_only=True)
class Classification(Recipe):
    """Pick one label. `labels` maps a value in the data (as text: "0") to the name the model writes."""

    labels: Mapping[str, str]
    """Data value -> label name, e.g. {"0": "negative", "1": "positive"}. A record may also carry the name itself."""

    metric: str = "accuracy_macro_f1"

    FIELDS: ClassVar[tuple[str, ...]] = ("text", "label")

    def __post_init__(self) -> None:
        super().__post_init__()
        labels = {str(k): v for k, v in self.labels.items()}
        names = list(labels.values())
        if not names or any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) < len(names):
            raise LoraforgeError(f"{self.name}: labels must map each value to a distinct, non-empty name: {labels}")
        object.__setattr__(self, "labels", labels)

    @property
    def names(self) -> list[str]:
        return list(self.labels.values())

    def prompt(self, record: Record) -> tuple[str, str]:
        return self._instruction(), self.fields(record).text("text").strip()

    def target(self, record: Record) -> str:
        f = self.fields(record)
        value = f.value("label")
        key = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if key in self.labels:
            return self.labels[key]
        if key in self.names:
            return key
        allowed = ", ".join(f"{k} ({v})" if k != v else k for k, v in self.labels.items())
        raise f.error("label", f"is {value!r}, not a known label", f"allowed: {allowed}; or set labels={{...}}")

    def reference(self, record: Record) -> str:
        return self.target(record)

    def parse_prediction(self, text: str, record: Record) -> str:
        return parse_label(text, self.names)

    def _instruction(self) -> str:
        names = self.names
        either = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        return self.instruction.replace("{labels}", either)


@dataclass(frozen=True, kw_only=True)
class PubMedQA(Classification):
    """Yes/no/maybe question about an abstract (its `context`: a string or a list of paragraphs)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("question", "context", "label")

    def prompt(self, record: Record) -> tuple[str, str]:
        f = self.fields(record)
        context = "\n".join(f.texts("context"))
        return self._instruction(), f"Context: {context}\n\nQuestion: {f.text('question')}"


@dataclass(frozen=True, kw_only=True)
class Ner(Recipe):
    """Named entities of a tokenized sentence, learned as an entity list (see `ner.py`), scored per token in BIO.

    The data's tags may be IOB1 (CoNLL-2003 as released) or BIO: both read into the same entities. References and
    parsed predictions are BIO (what seqeval expects).
    """

    types: Mapping[str, str] = field(
        default_factory=lambda: {"PER": "person", "ORG": "organisation", "LOC": "location", "MISC": "other name"}
    )
    """Entity type -> how the instruction describes it."""

    metric: str = "seqeval"

    FIELDS: ClassVar[tuple[str, ...]] = ("tokens", "ner_tags")

    def prompt(self, record: Record) -> tuple[str, str]:
        types = ", ".join(f"{t} ({d})" for t, d in self.types.items())
        return self.instruction.replace("{types}", types), " ".join(self.sentence(record)[0])

    def target(self, record: Record) -> str:
        tokens, tags = self.sentence(record)
        return render_entities(tokens, tag_spans(tags))

    def reference(self, record: Record) -> list[str]:
        tokens, tags = self.sentence(record)
        return spans_to_bio(tag_spans(tags), len(tokens))

    def parse_prediction(self, text: str, record: Record) -> list[str]:
        return parse_entities(text, self.sentence(record)[0], list(self.types))

    def sentence(self, record: Record) -> tuple[list[str], list[str]]:
        """The checked tokens and tags."""
        f = self.fields(record)
        tokens, tags = f.array("tokens"), f.array("ner_tags")
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token or token != "".join(token.split()):
                fix = "each token must be a non-empty string without spaces"
                raise f.error("tokens", f"item {i} is {token!r}", fix)
        if not all(isinstance(t, str) for t in tags):
            raise f.error("ner_tags", "holds a non-string", 'tags must be strings such as "O" or "B-PER"')
        if len(tags) != len(tokens):
            raise f.error("ner_tags", f"has {len(tags)} tags for {len(tokens)} tokens", "give one tag per token")
        problem = tag_problem(tags, list(self.types))
        if problem:
            raise f.error("ner_tags", problem)
        return tokens, tags


@dataclass(frozen=True, kw_only=True)
class Summarization(Recipe):
    """Source text (a string, or a list of sentences joined by spaces) -> its summary (the first of a list)."""

    metric: str = "rouge"

    FIELDS: ClassVar[tuple[str, ...]] = ("source", "target")

    def prompt(self, record: Record) -> tuple[str, str]:
        return self.instruction, " ".join(s.strip() for s in self.fields(record).texts("source"))

    def target(self, record: Record) -> str:
        return self.reference(record)[0]

    def reference(self, record: Record) -> list[str]:
        return [t.strip() for t in self.fields(record).texts("target")]

    def parse_prediction(self, text: str, record: Record) -> str:
        return re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip()


@dataclass(frozen=True, kw_only=True)
class ExtractiveQA(Recipe):
    """SQuAD-style question on a context; learns the first answer; `answers` are strings or {"text": ...} objects."""

    context_label: str = "Context: "
    question_label: str = "Question: "
    metric: str = "squad_em_f1"

    FIELDS: ClassVar[tuple[str, ...]] = ("context", "question", "answers")

    def prompt(self, record: Record) -> tuple[str, str]:
        f = self.fields(record)
        return self.instruction, f"{self.context_label}{f.text('context')}\n\n{self.question_label}{f.text('question')}"

    def target(self, record: Record) -> str:
        return self.reference(record)[0]

    def reference(self, record: Record) -> list[str]:
        f = self.fields(record)
        value = f.value("answers")
        items = value if isinstance(value, list) else [value]
        texts = [a.get("text") if isinstance(a, dict) else a for a in items]
        if not all(isinstance(t, str) for t in texts):
            raise f.error("answers", "is not a list of strings or of {\"text\": ...} objects")
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            raise f.error("answers", "has no non-empty answer", "fill it in or drop the record")
        return texts

    def parse_prediction(self, text: str, record: Record) -> str:
        return _first_line(text)


@dataclass(frozen=True, kw_only=True)
class DataToText(Recipe):
    """A meaning representation -> one reference text (E2E: `name[The Vaults], eatType[pub]` -> a sentence)."""

    metric: str = "bleu_nist"

    FIELDS: ClassVar[tuple[str, ...]] = ("mr", "ref")

    def prompt(self, record: Record) -> tuple[str, str]:
        return self.instruction, self.fields(record).text("mr")

    def target(self, record: Record) -> str:
        return " ".join(self.fields(record).text("ref").split())  # 2 of 42,061 E2E refs hold a line break

    def reference(self, record: Record) -> list[str]:
        return [self.target(record)]

    def parse_prediction(self, text: str, record: Record) -> str:
        return _first_line(text)


@dataclass(frozen=True, kw_only=True)
class LanguageModeling(Recipe):
    """Raw documents, every token learned; `load_examples` chunks the file's token stream (`text_chunks`)."""

    metric: str = "perplexity"

    FIELDS: ClassVar[tuple[str, ...]] = ("text",)
    chunked: ClassVar[bool] = True

    def prompt(self, record: Record) -> tuple[str, str]:
        return "", ""

    def target(self, record: Record) -> str:
        return self.fields(record).text("text")

    def reference(self, record: Record) -> str:
        return self.target(record)

    def parse_prediction(self, text: str, record: Record) -> str:
        return text.strip()

    def to_example(self, record: Record, tokenizer: PreTrainedTokenizerBase | None = None) -> Example:
        return Example.from_prompt("", self.target(record))


@dataclass(frozen=True, kw_only=True)
class TextToText(Summarization):
    """Your own task: the `input` column(s) -> the `output` column, scored with a text metric (`TEXT_METRICS`).

    `input` maps to one column, or to several joined by "+" (`input=context+question`), which the prompt then
    shows one per line as `column: value`. `output` is a string, or a list of references of which the first is
    learned. As a summary, the prediction is the answer's first paragraph.
    """

    metric: str = "token_f1"

    FIELDS: ClassVar[tuple[str, ...]] = ("input", "output")

    def prompt(self, record: Record) -> tuple[str, str]:
        source = self.columns.get("input", "input")
        if "+" not in source:
            return self.instruction, self.fields(record).text("input").strip()
        parts = [Fields(record, f"the {self.name} recipe reads the input columns {source}", {"input": c})
                 for c in source.split("+")]
        return self.instruction, "\n".join(f"{f.name('input')}: {f.text('input').strip()}" for f in parts)

    def reference(self, record: Record) -> list[str]:
        return [t.strip() for t in self.fields(record).texts("output")]


def parse_label(text: str, names: list[str]) -> str:
    """The label an answer gives: the name it starts with, else the one name it mentions; "" if neither."""
    words = " ".join(re.findall(r"\w+", text.lower()))
    normal = {n: " ".join(re.findall(r"\w+", n.lower())) for n in names}
    for name in sorted(names, key=lambda n: len(normal[n]), reverse=True):
        if words == normal[name] or words.startswith(normal[name] + " "):
            return name
    mentioned = [n for n in names if re.search(rf"(?<!\w){re.escape(normal[n])}(?!\w)", words)]
    return mentioned[0] if len(mentioned) == 1 else ""


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


RECIPES: dict[str, Recipe] = {
    "sst2": Classification(
        name="sst2", labels={"0": "negative", "1": "positive"}, columns={"text": "sentence"},
        instruction="Is the sentiment of this movie review {labels}? Answer with one word.",
    ),
    "pubmedqa": PubMedQA(
        name="pubmedqa", labels={"yes": "yes", "no": "no", "maybe": "maybe"}, metric="pubmedqa",
        instruction="Answer the research question from the abstract with one word: {labels}.",
    ),
    "conll2003": Ner(
        name="conll2003",
        instruction=(
            "List the named entities in the sentence in order, as `words: TYPE` separated by `; `, with TYPE one "
            "of {types}. Answer `none` if there are none."
        ),
    ),
    "dialogsum": Summarization(
        name="dialogsum", columns={"source": "dialogue", "target": "summary"},
        instruction="Summarize the dialogue in a few sentences.",
    ),
    "scitldr": Summarization(name="scitldr", instruction="Write a one-sentence TL;DR of this paper abstract."),
    "squad": ExtractiveQA(
        name="squad", instruction="Answer the question with a short span copied from the context."
    ),
    "cmrc2018": ExtractiveQA(
        name="cmrc2018", context_label="文章：", question_label="问题：", metric="squad_zh_em_f1",
        instruction="根据文章回答问题，答案是文章中的一段原文。",  # "Answer from the text; the answer is a span of it."
    ),
    "e2e": DataToText(
        name="e2e", prompt_style="plain",
        instruction="Describe the restaurant in one or two sentences from its attributes.",
    ),
    "lm": LanguageModeling(name="lm", instruction=""),
    "text2text": TextToText(name="text2text", instruction="Answer the request."),
}  # fmt: skip
"""The built-in recipes by name (`load_examples(..., recipe="sst2")`)."""


TEXT_RECIPES = (Summarization, ExtractiveQA, DataToText)  # TextToText is a Summarization
"""Recipes whose answers are free text scored against reference texts: `--metric` may choose their metric."""


def make_recipe(recipe: str | Recipe, columns: Mapping[str, str] | None = None, metric: str | None = None,
                instruction: str | None = None) -> Recipe:
    """The recipe a run declares: a built-in one by name, reading `columns`, with another `metric` (one of
    `TEXT_METRICS`, for text recipes) or `instruction` where given. Every command builds its recipe here."""
    from loraforge.metrics import TEXT_METRICS

    chosen = get_recipe(recipe).with_columns(columns)
    changes: dict[str, str] = {}
    if metric:
        if not isinstance(chosen, TEXT_RECIPES):
            text = ", ".join(r.name for r in RECIPES.values() if isinstance(r, TEXT_RECIPES))
            raise LoraforgeError(f"--metric {metric}: the {chosen.name} recipe is scored by {chosen.metric}; a metric "
                                 f"can be chosen for text recipes ({text})")
        if metric not in TEXT_METRICS:
            raise LoraforgeError(f"--metric {metric!r}: choose one of {', '.join(TEXT_METRICS)}")
        changes["metric"] = metric
    if instruction is not None:
        changes["instruction"] = instruction
    return replace(chosen, **changes) if changes else chosen


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (or the recipe itself)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise LoraforgeError(f'unknown recipe "{recipe}"; choose one of: {", ".join(RECIPES)}')
    return RECIPES[recipe]
