"""An Ollama `Modelfile` beside an exported GGUF: `FROM` the base file plus `ADAPTER` the adapter, or `FROM` the
merged file; the chat template and stop tokens of a ChatML model (SmolLM2's, Qwen's) in Ollama's Go template syntax.

Ollama bakes one adapter into each model it creates (`ollama create NAME -f Modelfile`), and it warns that an
adapter on another base behaves erratically: `FROM` names the exact base file the adapter was exported for.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

CHATML = '''TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
'''


def chat_template(gguf_file: Path) -> str | None:
    field = GGUFReader(gguf_file).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def write_modelfile(output: Path, base_gguf: Path, *, merged: bool) -> Path:
    """`Modelfile` in the output's folder; returns its path."""
    output = Path(output).resolve()
    lines = [f"FROM {output}"] if merged else [f"FROM {Path(base_gguf).resolve()}", f"ADAPTER {output}"]
    template = chat_template(output if merged else Path(base_gguf)) or ""
    body = "\n".join(lines) + "\n"
    if "<|im_start|>" in template:
        body += CHATML
    else:  # Ollama reads the GGUF's own tokenizer.chat_template for the templates it knows
        body += "# the chat template: Ollama's reading of the GGUF's tokenizer.chat_template\n"
    path = output.parent / "Modelfile"
    path.write_text(body, encoding="utf-8")
    return path
