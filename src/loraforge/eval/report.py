"""The report of an evaluation: a comparison table, plots, and sample outputs side by side, as Markdown and HTML.

`report.html` is self-contained: styles inline and every plot embedded as a base64 PNG data URI, so it opens from
a file: URL (or an e-mail attachment) with no network and no files beside it. `report.md` links the same PNGs,
written beside it. Plots (matplotlib, Agg backend): `metrics.png`, one bar chart per metric with a bar per model,
and `loss_curves.png`, each adapter's training (and validation) loss from the `metrics.jsonl` its training run
left in the adapter folder, when there is one.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from loraforge.eval.results import EvalResult, ModelResult
from loraforge.metrics import MULTI_REFERENCE_METRICS

COUNT_METRICS = ("tokens", "invalid")
"""Metric keys that are counts, shown in the table but not plotted."""
MAX_CELL_CHARS = 700
MAX_REFERENCES_SHOWN = 3
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def write_report(result: EvalResult, output: Path) -> dict[str, Path]:
    """Write the plots, `report.md` and `report.html` into `output`; returns them by name."""
    files: dict[str, Path] = {}
    if any(_plotted(m) for m in result.models):
        files["metrics_plot"] = plot_metrics(result.models, output / "metrics.png")
    curves = loss_curves(result.models)
    if curves:
        colors = {m.name: COLORS[i % len(COLORS)] for i, m in enumerate(result.models)}  # as in the bar charts
        files["loss_plot"] = plot_loss_curves(curves, output / "loss_curves.png", colors)
    files["report_md"] = output / "report.md"
    files["report_md"].write_text(render_markdown(result, files), encoding="utf-8")
    files["report_html"] = output / "report.html"
    files["report_html"].write_text(render_html(result, files), encoding="utf-8")
    return files


# ---- table ------------------------------------------------------------------------------------------------------
def metric_names(models: list[ModelResult]) -> list[str]:
    """Every metric any model has, in first-seen order."""
    return list(dict.fromkeys(k for m in models for k in m.metrics))


def table_rows(models: list[ModelResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison: models as rows, metrics then n, seconds and tokens/s as columns."""
    names = metric_names(models)
    header = ["model", *names, "n", "seconds", "tokens/s"]
    rows = [[m.name, *(fmt_value(k, m.metrics.get(k)) for k in names), str(m.n), f"{m.seconds:.1f}",
             f"{m.tokens_per_second:.0f}"] for m in models]
    return header, rows


def comparison_table(models: list[ModelResult]) -> str:
    """The table as aligned plain text, for the console."""
    header, rows = table_rows(models)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def fmt_value(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if name in COUNT_METRICS:
        return f"{value:.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


# ---- plots ------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plotted(model: ModelResult) -> list[str]:
    return [k for k, v in model.metrics.items() if k not in COUNT_METRICS and math.isfinite(v)]


def plot_metrics(models: list[ModelResult], png: Path) -> Path:
    """One bar chart per (non-count) metric, one bar per model, values written on the bars."""
    plt = _pyplot()
    names = [k for k in metric_names(models) if k not in COUNT_METRICS]
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    width = max(3.2, 0.55 * len(models) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows), dpi=100, squeeze=False)
    labels = [m.name for m in models]
    colors = [COLORS[i % len(COLORS)] for i in range(len(models))]
    for ax, name in zip(axes.flat, names):
        values = [m.metrics.get(name, math.nan) for m in models]
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(range(len(models)), shown, color=colors)
        for bar, v in zip(bars, values):
            ax.annotate(fmt_value(name, v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_title(name)
        ax.set_xticks(range(len(models)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, max([*shown, 1e-9]) * 1.18)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def loss_curves(models: list[ModelResult]) -> dict[str, list[dict]]:
    """Each adapter's metrics.jsonl rows (written by `loraforge train`), by model name; adapters without one skipped."""
    from loraforge.config import METRICS_FILE

    curves = {}
    for m in models:
        path = Path(m.adapter) / METRICS_FILE if m.adapter else None
        if path is not None and path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if any("loss" in r for r in rows):
                curves[m.name] = rows
    return curves


def plot_loss_curves(curves: dict[str, list[dict]], png: Path, colors: dict[str, str] | None = None) -> Path:
    """Training loss per step (line) and validation loss (dots) of each adapter, on one axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    for i, (name, rows) in enumerate(curves.items()):
        color = (colors or {}).get(name, COLORS[i % len(COLORS)])
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax.plot(*zip(*train), color=color, linewidth=1.3, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name} validation")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per learned token)")
    ax.set_title("training loss of each adapter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


# ---- samples ----------------------------------------------------------------------------------------------------
def samples(result: EvalResult) -> list[dict]:
    """The first `config.samples` examples: input, references, and each model's output, for the side-by-side view."""
    multi = result.recipe.metric in MULTI_REFERENCE_METRICS
    out = []
    for i, ex in enumerate(result.examples[:result.config.samples]):
        # The text the model learned to write is readable for every recipe (NER's references are BIO tags).
        refs = list(ex.references) if multi else [result.recipe.target(ex.record)]
        out.append({"where": ex.record.where, "input": result.recipe.prompt(ex.record)[1], "references": refs,
                    "outputs": {m.name: m.rows[i]["output"] for m in result.models}})
    return out


def _references_text(refs: list[str]) -> list[str]:
    shown = refs[:MAX_REFERENCES_SHOWN]
    return shown + ([f"(+{len(refs) - len(shown)} more)"] if len(refs) > len(shown) else [])


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + " …"


# ---- Markdown ---------------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return _clip(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(_md_cell, r)) + " |" for r in rows)]


def _facts(result: EvalResult) -> list[tuple[str, str]]:
    cfg = result.config
    decoding = "greedy" if cfg.num_beams == 1 else f"beam search, {cfg.num_beams} beams"
    facts = [("data", cfg.data), ("task", cfg.task)]
    if cfg.task == "generate":
        records = sum(len(ex.records) for ex in result.examples)
        facts += [("recipe", f"{result.recipe.name} (metric {result.recipe.metric})"),
                  ("examples", f"{len(result.examples)} ({records} records)"),
                  ("decoding", f"{decoding}, at most {cfg.max_new_tokens} new tokens, batch {cfg.batch_size}"
                   if cfg.answer == "generate" else "label-word scoring: the likeliest label after the prompt")]
    else:
        facts += [("recipe", result.recipe.name if result.recipe else "none (format detected)"),
                  ("examples", str(result.models[0].n if result.models else 0)),
                  ("metric", f"perplexity over learned tokens, max_length {cfg.max_length}")]
    if result.shots:
        lines = ", ".join(str(r.line) for r in result.shots)
        facts.append(("few-shot", f"{len(result.shots)} in-context examples (seed {cfg.seed}): {cfg.few_shot_data} "
                                   f"lines {lines}"))
    facts.append(("models", "; ".join(f"{m.name} = {m.base}" + (f" + {m.adapter}" if m.adapter else "")
                                      for m in result.models)))
    return facts


def render_markdown(result: EvalResult, files: dict[str, Path]) -> str:
    title = f"# loraforge eval: {result.recipe.name if result.recipe else 'perplexity'}"
    lines = [title, "", *(f"- **{k}**: {_md_cell(v)}" for k, v in _facts(result)), "", "## Results", ""]
    lines += _md_table(*table_rows(result.models))
    lines += ["", "Seconds are generation (or scoring) time without loading; tokens/s counts generated tokens "
              "(perplexity: tokens read).", ""]
    for key, caption in (("metrics_plot", "metrics"), ("loss_plot", "training loss")):
        if key in files:
            lines += [f"![{caption}]({files[key].name})", ""]
    if result.config.task == "generate" and result.config.samples:
        lines += ["## Samples", ""]
        header = ["input", "references", *(m.name for m in result.models)]
        rows = [[s["input"], "\n".join(_references_text(s["references"])), *s["outputs"].values()]
                for s in samples(result)]
        lines += _md_table(header, rows)
    return "\n".join(lines) + "\n"


# ---- HTML -------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples td { white-space: pre-wrap; font-size: 0.9em; max-width: 28em; }
table.samples td.ref { color: #555; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dt { font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render_html(result: EvalResult, files: dict[str, Path]) -> str:
    e = html.escape
    title = f"loraforge eval: {result.recipe.name if result.recipe else 'perplexity'}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", "<dl>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _facts(result)]
    parts += ["</dl>", "<h2>Results</h2>", '<table class="results">']
    header, rows = table_rows(result.models)
    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + f"<th>{e(row[0])}</th>" + "".join(f'<td class="num">{e(c)}</td>' for c in row[1:])
                     + "</tr>")
    parts.append("</table><p>Seconds are generation (or scoring) time without loading; tokens/s counts generated "
                 "tokens (perplexity: tokens read).</p>")
    for key, caption in (("metrics_plot", "Metrics"), ("loss_plot", "Training loss")):
        if key in files:
            parts.append(f'<h2>{caption}</h2><img src="{_data_uri(files[key])}" alt="{caption.lower()}">')
    if result.config.task == "generate" and result.config.samples:
        parts += ["<h2>Samples</h2>", '<table class="samples">', "<tr><th>input</th><th>references</th>"
                  + "".join(f"<th>{e(m.name)}</th>" for m in result.models) + "</tr>"]
        for s in samples(result):
            refs = "<br>".join(e(_clip(r)) for r in _references_text(s["references"]))
            cells = "".join(f"<td>{e(_clip(text))}</td>" for text in s["outputs"].values())
            parts.append(f'<tr><td title="{e(s["where"])}">{e(_clip(s["input"]))}</td><td class="ref">{refs}</td>'
                         f"{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
