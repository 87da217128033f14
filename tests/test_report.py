"""The eval report: comparison table, plots embedded in a self-contained HTML file, samples side by side, escaping."""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
import torch

from loraforge.data import RECIPES, Record
from loraforge.eval.report import comparison_table, fmt_value, write_report
from loraforge.eval.config import EvalConfig
from loraforge.eval.results import EvalExample, EvalResult, ModelResult

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(tmp_path: Path, with_curve: bool = True) -> EvalResult:
    adapter = tmp_path / "adapter_a"
    adapter.mkdir()
    if with_curve:
        rows = [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 11)] + [{"step": 10, "val_loss": 1.2}]
        (adapter / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [Record({"mr": "name[<b>Alimentum</b>] | area[river]", "ref": r}, "dev.csv", 2 + i)
               for i, r in enumerate(["Alimentum is by the river.", "A | pipe & <tag>"])]
    examples = [EvalExample(records, [r.fields["ref"] for r in records])]
    cfg = EvalConfig(data="dev.csv", recipe="e2e", adapters=(str(adapter),), output=str(tmp_path))

    def model(name: str, bleu: float, output: str, adapter_dir: str | None = None) -> ModelResult:
        row = {"model": name, "example": 0, "output": output}
        return ModelResult(name=name, base="base-model", adapter=adapter_dir, few_shot=0,
                           metrics={"bleu": bleu, "nist": math.nan}, n=1, seconds=2.0, load_seconds=1.0, tokens=50,
                           rows=[row])

    models = [model("base", 0.1234, "<script>alert(1)</script>\nsecond line"),
              model("adapter_a", 0.5678, "Alimentum | by the river", str(adapter))]
    return EvalResult(cfg, RECIPES["e2e"], examples, models)


def test_html_is_self_contained_with_plots_and_samples(tmp_path: Path) -> None:
    result = _result(tmp_path)
    files = write_report(result, tmp_path)
    page = files["report_html"].read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # metric bars and the loss curve
    assert all(base64.b64decode(img).startswith(PNG_MAGIC) for img in images)
    assert not re.search(r'(src|href)="(?!data:)', page) and "http" not in page  # nothing to fetch
    assert '<table class="samples">' in page and "<th>adapter_a</th>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "name[&lt;b&gt;Alimentum&lt;/b&gt;] | area[river]" in page
    assert "A | pipe &amp; &lt;tag&gt;" in page  # both references shown
    assert files["metrics_plot"].read_bytes().startswith(PNG_MAGIC)
    assert files["loss_plot"].read_bytes().startswith(PNG_MAGIC)


def test_markdown_has_table_links_and_escaped_samples(tmp_path: Path) -> None:
    md = write_report(_result(tmp_path), tmp_path)["report_md"].read_text()
    assert "| model | bleu | nist | n | seconds | tokens/s |" in md
    assert "| base | 0.1234 | n/a | 1 | 2.0 | 25 |" in md
    assert "| adapter_a | 0.5678 | n/a | 1 | 2.0 | 25 |" in md
    assert "![metrics](metrics.png)" in md and "![training loss](loss_curves.png)" in md
    sample = next(line for line in md.splitlines() if line.startswith("| name["))
    assert sample.count(" | ") == 3  # input, references, base, adapter_a: pipes inside cells are escaped
    assert "Alimentum \\| by the river" in sample and "alert(1)</script><br>second line" in sample


def test_no_loss_plot_without_metrics_jsonl(tmp_path: Path) -> None:
    files = write_report(_result(tmp_path, with_curve=False), tmp_path)
    assert "loss_plot" not in files and "training loss" not in files["report_md"].read_text()
    assert files["report_html"].read_text().count("data:image/png;base64,") == 1


def test_console_table_and_number_format() -> None:
    models = [ModelResult(name="base", base="m", adapter=None, few_shot=0,
                          metrics={"perplexity": 123.456, "tokens": 40.0}, n=3, seconds=1.5, tokens=30),
              ModelResult(name="long adapter name", base="m", adapter="a", few_shot=0,
                          metrics={"perplexity": 9.87654, "tokens": 40.0}, n=3, seconds=0.5, tokens=30)]
    lines = comparison_table(models).splitlines()
    assert lines[0].split() == ["model", "perplexity", "tokens", "n", "seconds", "tokens/s"]
    assert lines[2].split() == ["base", "123.46", "40", "3", "1.5", "20"]
    assert lines[3].split()[-5:] == ["9.8765", "40", "3", "0.5", "60"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert fmt_value("bleu", math.nan) == "n/a" and fmt_value("bleu", None) == "n/a"


def test_results_json_writes_undefined_metrics_as_null(tmp_path: Path) -> None:
    from loraforge.eval.run import _write_results

    path = _write_results(_result(tmp_path), tmp_path / "results.json")
    rows = json.loads(path.read_text())["models"]
    assert rows[0]["metrics"] == {"bleu": 0.1234, "nist": None}
    assert rows[1]["tokens_per_second"] == pytest.approx(25.0)
