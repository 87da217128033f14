"""What `loraforge eval` runs: `EvalConfig`, one typed field per flag."""
from __future__ import annotations

from dataclasses import dataclass

from loraforge.config import (ANSWER_HELP, ANSWERS, DEFAULT_MODEL, INSTRUCTION_HELP, METRIC_HELP, QUANTIZE_HELP,
                              QUANTIZE_METHODS, RECIPE_OPTIONS, opt, parse_mapping, with_adapter_recipe)
from loraforge.data import make_recipe
from loraforge.errors import LoraforgeError
from loraforge.infer.batch import BatchOptions
from loraforge.infer.score import check_answer, check_label_words

TASKS = ("generate", "text")
DTYPES = ("float32", "bfloat16", "auto")  # auto: config.resolve_dtype (bfloat16 where the CPU/GPU runs it natively)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What `loraforge eval` runs; each field is one flag (`--adapter` for `adapters`, repeated), built by the CLI."""

    data: str | None = opt(None, "records to score, e.g. a dev split (never the official test); required unless "
                                 "--tasks")
    tasks: str | None = opt(None, "a YAML task list (loraforge.eval.multitask): several tasks' dev data, each with "
                                  "its single adapter, against multi-task models (joint, combined) and a router; "
                                  "writes one table of the fine-tuning gain each keeps, with plots and each task's "
                                  "report. Replaces --data, --recipe and --adapter", metavar="FILE")
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
    base: bool = opt(True, "score the base model zero-shot (false: only the few-shot base and the adapters, e.g. when "
                           "another run already scored it on the same records)")
    few_shot: int = opt(0, "also score the base model with K in-context examples from --few-shot-data", metavar="K")
    few_shot_data: str | None = opt(None, "where the K examples come from, e.g. the training file (records with a "
                                          "scored prompt are skipped)", metavar="FILE")
    seed: int = opt(0, "seed of the few-shot draw")
    answer: str = opt("generate", ANSWER_HELP, choices=ANSWERS)
    num_beams: int = opt(1, "1 = greedy; more = beam search")
    max_new_tokens: int = opt(64, "tokens generated per answer at most")
    batch_size: int = opt(8, "prompts generated together (left-padded)")
    max_length: int = opt(512, "text task: tokens per example (longer ones are cut, lm text is chunked to this)")
    dtype: str = opt("float32", "float32, bfloat16, or auto: bfloat16 where this CPU/GPU runs it natively",
                     choices=DTYPES)
    device: str = opt("cpu", "auto, cpu, cuda or cuda:N")
    quantize: str | None = opt(None, QUANTIZE_HELP, choices=QUANTIZE_METHODS)
    threads: int = opt(0, "torch CPU threads (0 = torch's default, one per core); 1 is faster on a machine other "
                          "jobs keep busy")
    samples: int = opt(8, "examples shown side by side in the report")
    output: str = opt("runs/eval", "folder for results.json, predictions.jsonl, report.md, report.html and plots")

    def __post_init__(self) -> None:
        if self.tasks:
            given = [flag for flag, value in (("--data", self.data), ("--recipe", self.recipe),
                                              ("--adapter", self.adapters), ("--few-shot", self.few_shot),
                                              ("--num-beams", self.num_beams != 1),
                                              ("--answer", self.answer != "generate")) if value]
            if given:
                raise LoraforgeError(f"--tasks FILE takes each task's data, recipe and adapters from the file (and "
                                     f"decodes greedily); drop {', '.join(given)}")
            return
        if not self.data:
            raise LoraforgeError("eval needs the records to score: --data FILE (a dev split), or --tasks FILE")
        object.__setattr__(self, "adapters", tuple(self.adapters or ()))  # flags arrive as a list, or None
        if isinstance(self.columns, str):
            object.__setattr__(self, "columns", parse_mapping(self.columns))
        given = {name: getattr(self, name) for name in RECIPE_OPTIONS}
        for name, value in with_adapter_recipe(given, self.adapters[0] if self.adapters else None).items():
            object.__setattr__(self, name, value)
        task = self.task or ("text" if self.recipe in (None, "lm") else "generate")
        if task not in TASKS:
            raise LoraforgeError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        if task == "generate" and self.recipe in (None, "lm"):
            raise LoraforgeError("task generate needs a task recipe (--recipe e2e, sst2, ...) other than lm")
        check_answer(self.answer)
        if self.answer == "label-words":
            check_label_words(make_recipe(self.recipe) if self.recipe else None)
        if self.dtype not in DTYPES:
            raise LoraforgeError(f"dtype {self.dtype!r}: choose one of: {', '.join(DTYPES)}")
        if self.few_shot and (task != "generate" or not self.few_shot_data):
            raise LoraforgeError("--few-shot K needs a generation recipe and --few-shot-data FILE (e.g. the training "
                                 "file) to draw the K in-context examples from")
        if not (self.base or self.few_shot or self.adapters):
            raise LoraforgeError("--base false leaves nothing to score: give --adapter DIR or --few-shot K")
        for name in ("max_examples", "few_shot", "samples", "threads"):
            if getattr(self, name) < 0:
                raise LoraforgeError(f"{name} must be 0 or more, got {getattr(self, name)}")
        BatchOptions(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, batch_size=self.batch_size)
        object.__setattr__(self, "task", task)
