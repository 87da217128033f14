"""The `loraforge` command: train (flags, YAML, both), generate, inspect, merge, and how a user's mistake ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from fixtures.tiny_models import LAYERS, save_tiny_gpt2, tiny_llama
from loraforge.cli import main
from loraforge.config import TrainConfig
from helpers import hf_generate
from loraforge.lora import load_adapter
from loraforge.models import load_model
from loraforge.train import train
from tolerances import FP32, max_abs_diff

IDS = torch.tensor([[1, 4, 14, 15, 7, 12, 4, 25], [1, 35, 36, 39, 32, 5, 24, 2]])  # (2, 8), ids of the tiny vocab
TINY_LORA_PARAMS = 896  # r=4 on q_proj (32 -> 32) and v_proj (32 -> 16), 2 layers: 2 x 4 x (64 + 48)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), seed=0)


def _flags(llama_dir: Path, data_file: Path, output: Path) -> list[str]:
    return ["train", "--model", str(llama_dir), "--data", str(data_file), "--output", str(output),
            "--max-steps", "3", "--batch-size", "2", "--r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--lr", "0.05", "--seed", "0", "--target-modules", "q_proj,v_proj"]


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, data_file, tmp_path_factory) -> Path:
    """An adapter trained through the CLI, for generate and merge."""
    out = tmp_path_factory.mktemp("adapter")
    assert main(_flags(llama_dir, data_file, out)) == 0
    return out


def _resolved(output: Path) -> TrainConfig:
    return TrainConfig(**yaml.safe_load((output / "train_config.yaml").read_text(encoding="utf-8")))


def _summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text(encoding="utf-8"))


def _error_line(stderr: str) -> str:
    """The one error line, checked to be the only one and the last thing written."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("loraforge: error: ")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr  # nothing after it: no continuation lines
    assert "Traceback" not in stderr
    return errors[0]


# ---- train --------------------------------------------------------------------------------------------------------
def test_train_with_flags_equals_the_python_call(llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(llama_dir, data_file, out)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"adapter written to {out}: 3 steps, final loss ")

    expected = TrainConfig(model=str(llama_dir), data=str(data_file), output=str(out), max_steps=3, batch_size=2,
                           r=4, lora_alpha=8.0, lora_dropout=0.0, lr=0.05, seed=0, target_modules=["q_proj", "v_proj"])
    assert _resolved(out) == expected
    summary = _summary(out)
    assert summary["trainable_params"] == TINY_LORA_PARAMS
    python = train(TrainConfig(**{**expected.to_dict(), "output": str(tmp_path / "py")}), progress=False)
    assert summary["losses"] == python.summary["losses"]  # the CLI is the Python API, nothing more
    assert f"final loss {summary['final_loss']:.4f}" in printed


def test_train_from_yaml_with_flags_overriding_it(llama_dir, data_file, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    # "1e-3" is a string to YAML 1.1 (no dot); the option is a float, so it must still arrive as 0.001.
    config.write_text(f"model: {llama_dir}\ndata: {data_file}\noutput: {out}\nr: 8\nlora-alpha: 16\nlr: 1e-3\n"
                      "max_steps: 4\nbatch_size: 2\nlora_dropout: 0.0\n", encoding="utf-8")
    assert main(["train", str(config), "--r", "4", "--max-steps", "2"]) == 0
    resolved = _resolved(out)
    assert (resolved.r, resolved.max_steps) == (4, 2)  # flags win
    assert (resolved.lora_alpha, resolved.lr, resolved.batch_size) == (16, 0.001, 2)  # the rest from the YAML
    assert resolved.seed == TrainConfig.seed and resolved.max_length == TrainConfig.max_length  # defaults
    summary = _summary(out)
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    assert summary["trainable_params"] == TINY_LORA_PARAMS  # r=4 was trained, not only recorded


# ---- generate -----------------------------------------------------------------------------------------------------
def test_generate_prints_what_the_python_call_gives(adapter_dir, llama_dir, capsys):
    prompt = "the pub in the"
    rc = main(["generate", "--adapter", str(adapter_dir), "--model", str(llama_dir), "--prompt", prompt,
               "--max-new-tokens", "4", "--greedy"])
    assert rc == 0
    printed = capsys.readouterr().out

    model, tokenizer = load_model(str(llama_dir))
    ids = tokenizer(prompt)["input_ids"]
    base_text = tokenizer.decode(hf_generate(model, tokenizer, ids, 4), skip_special_tokens=True).strip()
    load_adapter(model, adapter_dir)
    new_ids = hf_generate(model, tokenizer, ids, 4)
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    assert len(new_ids) == 4 and text != base_text  # four tokens, and the adapter is what chose them
    assert printed == text + "\n"


def test_generate_chat_without_chat_template_exits_2(llama_dir, capsys):
    rc = main(["generate", "--model", str(llama_dir), "--prompt", "the pub", "--chat"])
    assert rc == 2
    err = _error_line(capsys.readouterr().err)
    assert "--chat" in err and "no chat template" in err


# ---- inspect ------------------------------------------------------------------------------------------------------
def test_inspect_lists_modules_and_counts_trainable_params(llama_dir, capsys):
    assert main(["inspect", "--model", str(llama_dir), "--r", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    # Per layer 4 attention + 3 MLP projections + 2 RMSNorms; then embed_tokens, the final norm and lm_head.
    assert len(rows) == LAYERS * 9 + 3
    assert ["model.layers.0.self_attn.q_proj", "Linear", "(32,", "32)"] in rows
    assert ["model.layers.1.self_attn.v_proj", "Linear", "(16,", "32)"] in rows
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert f"trainable params: {TINY_LORA_PARAMS:,} / {total + TINY_LORA_PARAMS:,}" in out
    assert "-> 4 layers: q_proj, v_proj" in out


# ---- merge --------------------------------------------------------------------------------------------------------
def test_merge_writes_a_plain_model_with_the_adapters_logits(adapter_dir, llama_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(merged_dir)]) == 0  # base from the adapter
    files = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith(".bin") for name in files)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, local_files_only=True).eval()
    base, _ = load_model(str(llama_dir))
    with torch.no_grad():
        base_logits = base(input_ids=IDS).logits
        adapted = load_adapter(base, adapter_dir).model(input_ids=IDS).logits
        merged_logits = merged(input_ids=IDS).logits
    assert max_abs_diff(adapted, base_logits) > 1e-3  # the adapter changes the output
    assert max_abs_diff(merged_logits, adapted) <= FP32


def test_merge_into_a_non_empty_folder_exits_2(adapter_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(target)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert str(target) in err and "not an empty folder" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


# ---- more mistakes, in-process: each once ended in a traceback or was silently accepted ---------------------------
MORE_MISTAKES = {
    "weight_decay": (["--weight-decay", "-1"], ["--weight-decay", ">= 0"]),  # was AdamW's ValueError traceback
    "warmup_steps": (["--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),  # was accepted; named as typed
    "output_is_a_file": (["--output", "{file}"], ["{file}", "is a file"]),  # was FileExistsError after training
}


@pytest.mark.parametrize("name", list(MORE_MISTAKES))
def test_train_mistakes_exit_2(name, llama_dir, data_file, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    extra, expected = MORE_MISTAKES[name]
    args = [*_flags(llama_dir, data_file, tmp_path / "out"), *(a.format(file=file) for a in extra)]
    assert main(args) == 2
    err = _error_line(capsys.readouterr().err)
    assert all(text.format(file=file) in err for text in expected), err
    assert not (tmp_path / "out").exists()


def test_merge_onto_a_file_exits_2(adapter_dir, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(file)]) == 2  # was NotADirectoryError
    assert "not an empty folder" in _error_line(capsys.readouterr().err)
    assert file.read_text() == "x"


def test_generate_temperature_zero_is_greedy_and_negative_exits_2(llama_dir, capsys):
    # `--temperature 0` once became 0.7 silently (`args.temperature or 0.7`); now it means greedy, as in OpenAI's API.
    assert main(["generate", "--model", str(llama_dir), "--prompt", "the", "--temperature", "0"]) == 0
    zero = capsys.readouterr().out
    assert main(["generate", "--model", str(llama_dir), "--prompt", "the", "--greedy"]) == 0
    assert capsys.readouterr().out == zero
    assert main(["generate", "--model", str(llama_dir), "--prompt", "the", "--temperature", "-1"]) == 2
    assert "temperature must be 0 (greedy) or more" in _error_line(capsys.readouterr().err)


# ---- a user's mistake, through the real command -------------------------------------------------------------------
def _command() -> list[str]:
    script = Path(sys.executable).with_name("loraforge")  # the console script pip installed
    return [str(script)] if script.exists() else [sys.executable, "-m", "loraforge.cli"]


def _bad_inputs(tmp: Path, llama_dir: Path, gpt2_dir: Path, data_file: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, texts the error line must contain)."""
    unknown = tmp / "unknown.yaml"
    unknown.write_text(f"model: {llama_dir}\nlearning_rate: 0.1\n", encoding="utf-8")
    broken_yaml = tmp / "broken.yaml"
    broken_yaml.write_text("r: 4\nlr: 0.01\nmodel: a: b\n", encoding="utf-8")  # line 3: a second colon
    broken_json = tmp / "broken.jsonl"
    broken_json.write_text('{"text": "the pub"}\n{"text": "the coffee\n', encoding="utf-8")  # line 2 cut short
    out = str(tmp / "out")
    train = ["train", "--model", str(llama_dir), "--output", out, "--max-steps", "1"]
    return {
        "gpt2_llama_targets": (["train", "--model", str(gpt2_dir), "--data", str(data_file), "--output", out,
                                "--target-modules", "q_proj,v_proj"], ["q_proj", "--target-modules c_attn"]),
        "yaml_unknown_key": (["train", str(unknown)],
                             [str(unknown), "learning_rate", "Known options:", "lr", "max_steps"]),
        "yaml_syntax_error": (["train", str(broken_yaml)], [f"{broken_yaml}:3", "not valid YAML"]),
        "negative_lr": ([*train, "--data", str(data_file), "--lr", "-1"], ["--lr", "positive", "-1"]),
        "missing_data": ([*train, "--data", str(tmp / "nope.jsonl")], [str(tmp / "nope.jsonl"), "not found"]),
        "broken_json_line": ([*train, "--data", str(broken_json)], [f"{broken_json}:2", "not valid JSON"]),
    }


BAD_INPUTS = ["gpt2_llama_targets", "yaml_unknown_key", "yaml_syntax_error", "negative_lr", "missing_data",
              "broken_json_line"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, llama_dir, gpt2_dir, data_file):
    """All the bad commands, started at once (each process pays ~3 s of imports): name -> (process, expected)."""
    tmp = tmp_path_factory.mktemp("bad")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, (args, expected) in _bad_inputs(tmp, llama_dir, gpt2_dir, data_file).items():
        proc = subprocess.Popen([*_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=tmp)
        runs[name] = (proc, expected)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_traceback(bad_runs, name):
    proc, expected = bad_runs[name]
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    line = _error_line(stderr)
    for text in expected:
        assert text in line, (text, line)
    assert "adapter written" not in stdout
    if name in ("negative_lr", "missing_data", "yaml_unknown_key", "yaml_syntax_error"):
        assert "loraforge: loaded" not in stderr  # found before the model is loaded, so the user does not wait
