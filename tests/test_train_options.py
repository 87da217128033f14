"""What a new user tripped on when training: a finished adapter is never overwritten silently, --max-length is
checked against the model, --epochs counts passes, a tiny dataset says that steps repeat rows, -q works after the
subcommand, errors name the flags typed, and --help prints every option's text."""
from __future__ import annotations

import json
import logging

import pytest

from loraforge.cli import main
from loraforge.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(llama_dir, data_file, out, *more: str) -> list[str]:
    return ["train", "--model", str(llama_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "2",
            "--batch-size", "2", "--r", "2", "--lora-alpha", "4", "--lora-dropout", "0", "--seed", "0",
            "--target-modules", "q_proj,v_proj", *more]


def _error(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("loraforge: error:"))


def test_a_finished_adapter_is_not_overwritten(llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(llama_dir, data_file, out)) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(_flags(llama_dir, data_file, out, "--lr", "0.5")) == 2
    message = _error(capsys.readouterr().err)
    assert str(out) in message and "--overwrite" in message and "--resume" in message
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(_flags(llama_dir, data_file, out, "--lr", "0.5", "--overwrite")) == 0  # a yes/no flag alone
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_max_length_beyond_the_models_context_is_refused(llama_dir, data_file, tmp_path, capsys):
    assert main(_flags(llama_dir, data_file, tmp_path / "o", "--max-length", "1000000")) == 2
    assert "--max-length 1000000 is longer than" in capsys.readouterr().err and not (tmp_path / "o" / "x").exists()


def test_epochs_set_the_steps_and_a_tiny_dataset_says_it_repeats(llama_dir, data_file, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="loraforge"):
        assert main(_flags(llama_dir, data_file, out, "--epochs", "2", "--batch-size", "8", "--packing",
                           "false")) == 0
    steps = json.loads((out / loop.SUMMARY_FILE).read_text())["steps"]
    assert steps == 2  # 5 records, 8 a step: ceil(2 x 5 / 8) = 2
    assert "fewer than one batch of 8: every step repeats rows" in caplog.text


def test_quiet_after_the_subcommand_and_flag_names_in_errors(llama_dir, data_file, tmp_path, capsys):
    assert main([*_flags(llama_dir, data_file, tmp_path / "q"), "-q"]) == 0
    assert "train:" not in capsys.readouterr().err  # no progress bar, no info lines
    assert main(_flags(llama_dir, data_file, tmp_path / "e", "--warmup-steps", "-1")) == 2
    assert "--warmup-steps must be" in _error(capsys.readouterr().err)


def test_train_help_prints_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "~30% slower" in text and "{'option_strings'" not in text and "--epochs" in text


def test_a_wrong_columns_field_lists_the_files_columns(llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "the pub", "a": "the river"}\n', encoding="utf-8")
    assert main(_flags(llama_dir, data, tmp_path / "o", "--columns", "instruction=question,output=a")) == 2
    message = _error(capsys.readouterr().err)
    assert 'd.jsonl:1: field "question" (as "instruction") is missing' in message
    assert 'the record has "q", "a"' in message


def test_threads_follow_the_cpus_other_processes_leave_free(monkeypatch):
    """CpuShare's arithmetic on /proc samples: busy jiffies of our CPUs less our own over the wall time."""
    import torch

    from loraforge.train import runtime

    threads = torch.get_num_threads()
    samples = iter([(0, 0, 0.0), (100, 0, 1.0),     # first look: 100 jiffies busy in 1 s, none ours: 1 core
                    (300, 190, 2.0),                 # 200 busy, 190 ours: others 0.1 core
                    (550, 340, 3.0)])                # 250 busy, 150 ours: others 1.0 core
    monkeypatch.setattr(runtime.CpuShare, "_sample", lambda self: next(samples))
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(runtime.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    torch.set_num_threads(2)
    try:
        with runtime.CpuShare() as share:
            assert share.threads == 1  # one of the two CPUs was taken before the first step
            assert share.update() == 2  # others at 0.1 core: both free again
            assert share.update() == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # the run's end gives the process its threads back
    finally:
        torch.set_num_threads(threads)


def test_release_memory_after_each_step_unless_told_not_to(llama_dir, data_file, tmp_path, monkeypatch, capsys):
    """By default the CPU's freed pages go back to the OS after each step (less peak RSS); release_memory false
    keeps them in the heap (no re-faulting: faster short steps)."""
    from loraforge.train import run

    calls: list[int] = []
    monkeypatch.setattr(run, "release_free_memory", lambda: calls.append(1) or True)
    assert main(_flags(llama_dir, data_file, tmp_path / "a")) == 0 and len(calls) == 2
    assert main(_flags(llama_dir, data_file, tmp_path / "b", "--release-memory", "false")) == 0 and len(calls) == 2
    with pytest.raises(SystemExit) as stop:
        main(_flags(llama_dir, data_file, tmp_path / "c", "--release-memory", "sometimes"))
    assert stop.value.code == 2 and "--release-memory" in capsys.readouterr().err
