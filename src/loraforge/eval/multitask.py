"""Multi-task evaluation: several tasks, each with its single-task adapter (the ceiling), against the models meant to
do all of them at once (a jointly trained adapter, combinations of the single adapters) and a router that picks
the single adapter per input. One command, one table of what each keeps:

    loraforge eval --tasks tasks.yaml --output runs/mt-report

tasks.yaml (paths relative to the current directory, as everywhere else):

    model: smollm2-135m-instruct        # optional; default: the first task adapter's base
    tasks:
      - name: sentiment                 # the task, and the session's name for its single adapter
        recipe: sst2
        data: runs/data/sst2_dev.tsv    # dev records (never the official test split)
        adapter: runs/mt/single/sentiment
        columns: {text: sentence}       # optional, as --columns
        file_format: tsv                # optional, as --file-format
        metric: ...                     # optional, as --metric
        instruction: ...                # optional, as --instruction
        max_examples: 200               # optional (0: all)
        max_new_tokens: 8               # optional (64)
    models:                             # optional: rows that answer every task with one adapter
      joint: runs/mt/joint
      ties: runs/mt/combined/ties
    router: runs/mt/router              # optional: picks among the tasks' adapters; its classes are the task names

Rows: `base`; `single` (each input on its own task's adapter); each of `models`; `routed` (each input on the adapter
the router picks). A row decodes every task's prompts together through the engine, greedy, each request with its
task's token budget and its row's adapter, so `single` and `routed` are mixed batches and the routed row's tokens/s
over the single row's is what routing costs a mixed batch (the routing forward included).

Per task and row: the task's score (`PRIMARY[metric]`), its ratio to the single adapter's, and the share of the
fine-tuning gain kept, (row - base) / (single - base), undefined when the single adapter does not beat the base. Per
row: the mean gain kept over the tasks, the worst task's, and for NER tasks the share of outputs that parse as an
entity list (`data.ner.entities_parse`). Written to the output folder: multitask.json, multitask.md and a
self-contained multitask.html (the table and its plots), and each task's own eval report in <output>/<task>/
(`eval.run.write_outputs`: results.json, predictions.jsonl, report.md/html with the metric plots and samples).
A task's seconds in its own report are the row's time shared out by generated tokens.
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraforge.config import DEFAULT_MODEL, adapter_quantize
from loraforge.data import Recipe, make_recipe
from loraforge.data.ner import entities_parse
from loraforge.data.recipes import Ner
from loraforge.errors import LoraforgeError
from loraforge.eval.config import EvalConfig
from loraforge.eval.report import COLORS, _CSS, _data_uri, _md_table, _pyplot
from loraforge.eval.results import EvalExample, EvalResult, ModelResult
from loraforge.eval.run import load_eval_examples, score_outputs, write_outputs
from loraforge.infer.engine import Engine, Request, SamplingParams
from loraforge.infer.session import InferenceSession

log = logging.getLogger("loraforge")

PRIMARY = {"accuracy_macro_f1": "accuracy", "pubmedqa": "accuracy", "seqeval": "f1", "rouge": "rougeL",
           "rouge_l": "rougeL", "bleu_nist": "bleu", "bleu": "bleu", "chrf": "chrf", "squad_em_f1": "f1",
           "squad_zh_em_f1": "f1", "token_f1": "f1", "exact_match": "exact_match"}
"""The score a task is ranked by, per recipe metric; higher is better for each."""
BASE, SINGLE, ROUTED = "base", "single", "routed"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TASK_KEYS = {"name", "recipe", "data", "adapter", "columns", "file_format", "metric", "instruction", "max_examples",
             "max_new_tokens"}
TOP_KEYS = {"model", "tasks", "models", "router"}


# ---- the task list ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: str
    recipe: str
    data: str
    adapter: str
    columns: dict[str, str] | None = None
    file_format: str | None = None
    metric: str | None = None
    instruction: str | None = None
    max_examples: int = 0
    max_new_tokens: int = 64


@dataclass(frozen=True)
class TaskList:
    tasks: list[TaskSpec]
    models: dict[str, str]
    router: str | None
    model: str | None
    source: str


class _Mapping(dict):
    line = 0


class _LineLoader(yaml.SafeLoader):
    """YAML's safe loader, each mapping remembering its line (for errors that point at it)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_task_list(path: str | Path) -> TaskList:
    """Read and check a task list; a problem is a `LoraforgeError` naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"{path}: no such task list (a YAML file with tasks: and optionally models:, router:)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        raise LoraforgeError(f"{path}: not valid YAML ({err})") from None

    def fail(where: Any, name: str, problem: str) -> LoraforgeError:
        line = getattr(where, "line", 0)
        return LoraforgeError(f"{path}{f', line {line}' if line else ''}: {name}: {problem}")

    if not isinstance(raw, dict):
        raise LoraforgeError(f"{path}: expected a mapping with tasks: (a list) and optionally model:, models:, router:")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise fail(raw, ", ".join(unknown), f"unknown key; a task list has {', '.join(sorted(TOP_KEYS))}")
    items = raw.get("tasks")
    if not isinstance(items, list) or not items:
        raise fail(raw, "tasks", "give a list of tasks, each with name, recipe, data and adapter")
    tasks: list[TaskSpec] = []
    for i, item in enumerate(items):
        where = f"tasks[{i}]"
        if not isinstance(item, dict):
            raise fail(raw, where, "each task is a mapping with name, recipe, data and adapter")
        unknown = sorted(set(item) - TASK_KEYS)
        if unknown:
            raise fail(item, f"{where}.{unknown[0]}", f"unknown key; a task takes {', '.join(sorted(TASK_KEYS))}")
        for key in ("name", "recipe", "data", "adapter"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise fail(item, f"{where}.{key}", "missing or not a string")
        for key in ("file_format", "metric", "instruction"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise fail(item, f"{where}.{key}", f"must be a string, got {item[key]!r}")
        if item.get("columns") is not None and not isinstance(item["columns"], dict):
            raise fail(item, f"{where}.columns", "a mapping of field renames, ours: theirs")
        for key, least in (("max_examples", 0), ("max_new_tokens", 1)):
            value = item.get(key, least)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise fail(item, f"{where}.{key}", f"a whole number of at least {least}, got {value!r}")
        _check_name(item["name"], lambda problem: fail(item, f"{where}.name", problem))
        if not Path(item["data"]).is_file():
            raise fail(item, f"{where}.data", f"{item['data']} not found")
        tasks.append(TaskSpec(**{k: v for k, v in item.items()}))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise fail(raw, "tasks", f"task names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    models = raw.get("models") or {}
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise fail(raw, "models", "a mapping of row name: adapter folder")
    for name in models:
        _check_name(str(name), lambda problem: fail(models, f"models.{name}", problem))
        if name in names:
            raise fail(models, f"models.{name}", "is also a task's name; name the row something else")
    router = raw.get("router")
    if router is not None and not isinstance(router, str):
        raise fail(raw, "router", "the router's folder (loraforge router --output)")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise fail(raw, "model", "a model name or folder")
    return TaskList(tasks, {str(k): v for k, v in models.items()}, router, model, str(path))


def _check_name(name: str, fail) -> None:
    if not NAME.fullmatch(name):
        raise fail(f"{name!r} is not a name: letters, digits, '.', '_', '-', starting with a letter or digit")
    if name in (BASE, SINGLE, ROUTED):
        raise fail(f"{name!r} is the name of a built-in row ({BASE}, {SINGLE}, {ROUTED}); choose another")


# ---- results ------------------------------------------------------------------------------------------------------
@dataclass
class RowResult:
    """One row of the table: a model across every task."""

    name: str
    adapter: str | None
    scores: dict[str, float] = field(default_factory=dict)
    """Task -> its primary score."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Task -> every metric of its recipe."""
    parses: dict[str, float] = field(default_factory=dict)
    """NER task -> share of outputs that parse as an entity list."""
    routed_right: dict[str, float] = field(default_factory=dict)
    """Routed row: task -> share of its inputs routed to its own adapter."""
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class MultiTaskResult:
    tasks: list[TaskSpec]
    primary: dict[str, str]
    """Task -> the metric key its score is."""
    rows: list[RowResult]
    base: str
    examples: list[int]
    """Examples scored per task, in task order."""
    files: dict[str, Path] = field(default_factory=dict)

    def row(self, name: str) -> RowResult:
        return next(r for r in self.rows if r.name == name)

    def ratio(self, row: RowResult, task: str) -> float:
        single = self.row(SINGLE).scores[task]
        return row.scores[task] / single if single else math.nan

    def gain_kept(self, row: RowResult, task: str) -> float:
        base, single = self.row(BASE).scores[task], self.row(SINGLE).scores[task]
        return (row.scores[task] - base) / (single - base) if single > base else math.nan

    def summary(self, row: RowResult) -> dict[str, float]:
        kept = [self.gain_kept(row, t.name) for t in self.tasks]
        finite = [k for k in kept if math.isfinite(k)]
        ratios = [self.ratio(row, t.name) for t in self.tasks]
        return {"mean_gain_kept": sum(finite) / len(finite) if finite else math.nan,
                "worst_gain_kept": min(finite) if finite else math.nan,
                "mean_ratio": sum(ratios) / len(ratios)}


# ---- running ------------------------------------------------------------------------------------------------------
def run_multitask(cfg: EvalConfig) -> MultiTaskResult:
    """Evaluate every row of `cfg.tasks`' task list on every task; write the table, plots and per-task reports."""
    import torch

    from loraforge.infer.router import Router
    from loraforge.models import adapter_base

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = read_task_list(cfg.tasks)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    recipes: dict[str, Recipe] = {}
    examples: dict[str, list[EvalExample]] = {}
    for task in spec.tasks:
        recipes[task.name] = make_recipe(task.recipe, task.columns, task.metric, task.instruction)
        examples[task.name] = load_eval_examples(task.data, recipes[task.name], task.file_format, task.max_examples)
    base = spec.model or adapter_base(spec.tasks[0].adapter) or DEFAULT_MODEL
    adapters = [t.adapter for t in spec.tasks] + list(spec.models.values())
    session = InferenceSession.open(base, {**{t.name: t.adapter for t in spec.tasks}, **spec.models},
                                    dtype=cfg.dtype, device=cfg.device,
                                    quantize=cfg.quantize or adapter_quantize(adapters))
    router = None
    if spec.router:
        router = Router.load(spec.router)
        router.check(session)
        router.require_adapters([t.name for t in spec.tasks])

    prompts, owners = [], []  # every task's prompts, in task order; each one's task
    for task in spec.tasks:
        prompts += [recipes[task.name].encode_prompt(ex.record, session.tokenizer) for ex in examples[task.name]]
        owners += [task.name] * len(examples[task.name])
    budget = {t.name: SamplingParams(max_new_tokens=t.max_new_tokens) for t in spec.tasks}
    # Run order: the single and routed rows last and back to back, so their throughputs (what routing costs) are
    # measured under the same conditions; the table shows base, single, the models, routed.
    plan: list[tuple[str, str | None, list[str | None] | None]] = [
        (BASE, None, [None] * len(prompts)),
        *((name, folder, [name] * len(prompts)) for name, folder in spec.models.items()),
        (SINGLE, None, list(owners))]
    if router is not None:
        plan.append((ROUTED, spec.router, None))
    primary = {t.name: _primary(recipes[t.name]) for t in spec.tasks}
    result = MultiTaskResult(spec.tasks, primary, [], base, [len(examples[t.name]) for t in spec.tasks])
    per_task: dict[str, list[ModelResult]] = {t.name: [] for t in spec.tasks}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # similar lengths batch together
    for name, adapter, routes in plan:
        log.info("row %s: %d prompts over %d tasks", name, len(prompts), len(spec.tasks))
        start = time.perf_counter()
        if routes is None:
            routes = router.route(session, prompts, batch_size=cfg.batch_size)
        requests = [Request(list(prompts[i]), routes[i], budget[owners[i]]) for i in order]
        done = Engine(session, max_batch=cfg.batch_size).run(requests)
        seconds = time.perf_counter() - start
        new_ids: list[list[int]] = [[] for _ in prompts]
        for i, request in zip(order, done):
            new_ids[i] = request.output_ids
        row = RowResult(name, adapter, seconds=seconds, tokens=sum(len(ids) for ids in new_ids))
        first = 0
        for task in spec.tasks:
            n = len(examples[task.name])
            ids, chosen = new_ids[first:first + n], routes[first:first + n]
            first += n
            model = _score_task(task, recipes[task.name], examples[task.name], ids, session.tokenizer, name, adapter,
                                base, seconds * sum(map(len, ids)) / max(1, row.tokens))
            per_task[task.name].append(model)
            row.metrics[task.name] = model.metrics
            row.scores[task.name] = model.metrics[primary[task.name]]
            if isinstance(recipes[task.name], Ner):
                row.parses[task.name] = sum(r["parses"] for r in model.rows) / n
            if name == ROUTED:
                row.routed_right[task.name] = sum(c == task.name for c in chosen) / n
        result.rows.append(row)
    shown = [BASE, SINGLE, *spec.models, ROUTED]
    result.rows.sort(key=lambda r: shown.index(r.name))
    for task in spec.tasks:  # each task's ordinary report, in its own folder
        task_cfg = dataclasses.replace(cfg, tasks=None, data=task.data, recipe=task.recipe, columns=task.columns,
                                       metric=task.metric, instruction=task.instruction, file_format=task.file_format,
                                       max_examples=task.max_examples, max_new_tokens=task.max_new_tokens,
                                       adapters=(), output=str(output / task.name))
        Path(task_cfg.output).mkdir(exist_ok=True)
        write_outputs(EvalResult(task_cfg, recipes[task.name], examples[task.name], per_task[task.name]),
                      Path(task_cfg.output))
    result.files = write_multitask_report(result, output)
    return result


def _primary(recipe: Recipe) -> str:
    if recipe.metric not in PRIMARY:
        raise LoraforgeError(f"recipe {recipe.name} scores {recipe.metric}, which the multi-task table cannot rank "
                             f"(it ranks {', '.join(PRIMARY)}); give the task a metric: among them")
    return PRIMARY[recipe.metric]


def _score_task(task: TaskSpec, recipe: Recipe, examples: list[EvalExample], new_ids: list[list[int]], tokenizer,
                row: str, adapter: str | None, base: str, seconds: float) -> ModelResult:
    metrics, rows = score_outputs(row, recipe, examples, new_ids, tokenizer)
    if isinstance(recipe, Ner):
        for entry, ex in zip(rows, examples):
            entry["parses"] = entities_parse(entry["output"], recipe.sentence(ex.record)[0], list(recipe.types))
    return ModelResult(name=row, base=base, adapter=adapter, few_shot=0, metrics=metrics, n=len(examples),
                       seconds=seconds, tokens=sum(len(ids) for ids in new_ids), rows=rows)


# ---- the report ---------------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.0f}%"


def table(result: MultiTaskResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per task 'score (ratio to single, gain kept)', then the row's mean and worst gain kept,
    NER outputs that parse, and tokens/s."""
    ner = [t.name for t in result.tasks if t.name in result.rows[0].parses]
    header = ["model", *(f"{t.name} ({result.primary[t.name]})" for t in result.tasks), "mean gain kept",
              "worst task", *(f"{n} parses" for n in ner), "tokens/s"]
    rows = []
    for row in result.rows:
        cells = [row.name]
        for task in result.tasks:
            score = row.scores[task.name]
            if row.name in (BASE, SINGLE):
                cells.append(f"{score:.4f}")
            else:
                cells.append(f"{score:.4f} ({result.ratio(row, task.name):.2f}x, "
                             f"{_pct(result.gain_kept(row, task.name))})")
        summary = result.summary(row)
        worst = min((t.name for t in result.tasks if math.isfinite(result.gain_kept(row, t.name))),
                    key=lambda t: result.gain_kept(row, t), default=None)
        if row.name == BASE:
            cells += ["0%", "-"]
        else:
            cells += [_pct(summary["mean_gain_kept"]),
                      f"{_pct(summary['worst_gain_kept'])} ({worst})" if worst else "n/a"]
        cells += [_pct(row.parses[n]) for n in ner]
        cells.append(f"{row.tokens_per_second:.0f}")
        rows.append(cells)
    return header, rows


def _notes(result: MultiTaskResult) -> list[str]:
    notes = ["Each cell: the task's score (its ratio to the single adapter's; the share of the fine-tuning gain it "
             "keeps, (row - base) / (single - base)). The mean and worst are over the tasks' gain kept."]
    if any(r.name == ROUTED for r in result.rows):
        routed, single = result.row(ROUTED), result.row(SINGLE)
        right = ", ".join(f"{t} {_pct(v)}" for t, v in routed.routed_right.items())
        notes.append(f"Router: inputs sent to their own task's adapter: {right}. Routed throughput "
                     f"{routed.tokens_per_second:.1f} tokens/s against {single.tokens_per_second:.1f} for the same "
                     f"mixed batch served the right adapter directly: "
                     f"{routed.tokens_per_second / single.tokens_per_second:.3f}x (the routing forward included).")
    notes.append("Tasks: " + "; ".join(f"{t.name} = {t.recipe} on {t.data} ({n} examples), single adapter "
                                       f"{t.adapter}" for t, n in zip(result.tasks, result.examples)) + ".")
    models = [r for r in result.rows if r.adapter and r.name != ROUTED]
    if models:
        notes.append("Rows: " + "; ".join(f"{r.name} = {r.adapter}" for r in models) + ".")
    return notes


def plot_gain_kept(result: MultiTaskResult, png: Path) -> Path:
    """Grouped bars: per row (but the base), each task's share of the fine-tuning gain kept, and the mean."""
    plt = _pyplot()
    rows = [r for r in result.rows if r.name != BASE]
    tasks = [t.name for t in result.tasks]
    width = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2), dpi=100)
    for k, task in enumerate(tasks):
        values = [100 * result.gain_kept(r, task) for r in rows]
        ax.bar([i + (k - (len(tasks) - 1) / 2) * width for i in range(len(rows))],
               [v if math.isfinite(v) else 0.0 for v in values], width, label=task, color=COLORS[k % len(COLORS)])
    means = [100 * result.summary(r)["mean_gain_kept"] for r in rows]
    ax.plot(range(len(rows)), means, "k_", markersize=22, markeredgewidth=2, label="mean")
    ax.axhline(100, color="#888", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of the fine-tuning gain kept (%)")
    ax.set_title("what each multi-task model keeps of the single adapters' gain over the base")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(tasks) + 1)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_scores(result: MultiTaskResult, png: Path) -> Path:
    """One bar chart per task: every row's score, the base and single as reference lines."""
    plt = _pyplot()
    tasks = result.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), dpi=100, squeeze=False)
    names = [r.name for r in result.rows]
    for ax, task in zip(axes.flat, tasks):
        values = [r.scores[task.name] for r in result.rows]
        ax.bar(range(len(names)), values, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
        ax.axhline(result.row(BASE).scores[task.name], color="#888", linewidth=0.8, linestyle=":")
        ax.axhline(result.row(SINGLE).scores[task.name], color="#222", linewidth=0.8, linestyle="--")
        ax.set_title(f"{task.name}: {result.primary[task.name]}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_multitask_report(result: MultiTaskResult, output: Path) -> dict[str, Path]:
    files = {"gain_plot": plot_gain_kept(result, output / "gain_kept.png"),
             "scores_plot": plot_scores(result, output / "task_scores.png")}
    header, rows = table(result)
    notes = _notes(result)
    md = ["# loraforge eval: multi-task", "", "<!-- table -->", *_md_table(header, rows), "",
          *(f"- {n}" for n in notes), "<!-- table -->", "",
          f"![gain kept]({files['gain_plot'].name})", "", f"![scores]({files['scores_plot'].name})", "",
          "Each task's own report (metrics, plots, samples): " + ", ".join(f"[{t.name}]({t.name}/report.html)"
                                                                          for t in result.tasks), ""]
    files["multitask_md"] = output / "multitask.md"
    files["multitask_md"].write_text("\n".join(md), encoding="utf-8")
    e = html.escape
    parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>loraforge eval: multi-task"
             f"</title><style>{_CSS}</style></head><body>", "<h1>loraforge eval: multi-task</h1>",
             '<table class="results">', "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + f"<th>{e(r[0])}</th>" + "".join(f'<td class="num">{e(c)}</td>' for c in r[1:]) + "</tr>"
              for r in rows]
    parts += ["</table>", "<ul>", *(f"<li>{e(n)}</li>" for n in notes), "</ul>"]
    for key, caption in (("gain_plot", "Gain kept"), ("scores_plot", "Scores per task")):
        parts.append(f'<h2>{caption}</h2><img src="{_data_uri(files[key])}" alt="{caption.lower()}">')
    parts.append("<p>Each task's own report: " + ", ".join(f'<a href="{e(t.name)}/report.html">{e(t.name)}</a>'
                                                           for t in result.tasks) + "</p></body></html>")
    files["multitask_html"] = output / "multitask.html"
    files["multitask_html"].write_text("\n".join(parts) + "\n", encoding="utf-8")
    data = {"base": result.base, "primary": result.primary, "tasks": [dataclasses.asdict(t) for t in result.tasks],
            "rows": [{"name": r.name, "adapter": r.adapter, "scores": r.scores, "metrics": r.metrics,
                      "ratio": {t.name: _finite(result.ratio(r, t.name)) for t in result.tasks},
                      "gain_kept": {t.name: _finite(result.gain_kept(r, t.name)) for t in result.tasks},
                      **{k: _finite(v) for k, v in result.summary(r).items()}, "parses": r.parses,
                      "routed_right": r.routed_right, "seconds": round(r.seconds, 2), "tokens": r.tokens,
                      "tokens_per_second": round(r.tokens_per_second, 2)} for r in result.rows]}
    files["multitask_json"] = output / "multitask.json"
    files["multitask_json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
