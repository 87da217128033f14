"""The training engine: resume equivalence (kill -9 included), atomic checkpoints, bf16 vs fp32, accumulation,
LoRA+, validation, early stopping, and what a run leaves on disk."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.tiny_models import tiny_tokenizer, write_jsonl
from helpers import tiny_llama
from loraforge.config import TrainConfig
from loraforge.data import IGNORE_INDEX, collate, load_examples
from loraforge.lora import LoraConfig, LoraModel
from loraforge.train import checkpoint as ckpt
from loraforge.train import loop, train
from loraforge.train.loss import causal_lm_loss, token_loss_sum
from loraforge.train.schedule import lr_factor, make_optimizer

OPTIONS = dict(batch_size=2, lr=1e-2, seed=0, r=4, lora_alpha=8, lora_dropout=0.1, target_modules="q_proj,v_proj",
               dtype="float32")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(llama_dir, data_file, output, **overrides) -> TrainConfig:
    return TrainConfig(model=str(llama_dir), data=str(data_file), output=str(output), **{**OPTIONS, **overrides})


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bit-exact: same ops, same order, one thread


# ---- resume ------------------------------------------------------------------------------------------------------
def test_resume_after_step_5_equals_10_straight(llama_dir, data_file, tmp_path):
    straight = train(_cfg(llama_dir, data_file, tmp_path / "straight", max_steps=10), progress=False).summary
    cut = tmp_path / "cut"
    train(_cfg(llama_dir, data_file, cut, max_steps=10, save_every=5), progress=False)
    # as if killed right after step 5's checkpoint: later checkpoints and the final adapter never happened
    import shutil
    shutil.rmtree(cut / "checkpoints" / "step-10")
    (cut / "adapter_model.safetensors").unlink()
    resumed = train(loop.resume_config(cut, {}), resume=True, progress=False).summary
    assert resumed["losses"] == straight["losses"]
    assert resumed["train_tokens"] == straight["train_tokens"]
    _assert_same_adapter(tmp_path / "straight", cut)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # no repeated steps in the log after the resume


def test_keep_last_k_checkpoints(llama_dir, data_file, tmp_path):
    train(_cfg(llama_dir, data_file, tmp_path, max_steps=6, save_every=1, keep_checkpoints=2), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-5", "step-6"]


def test_crash_mid_checkpoint_leaves_last_good_one(llama_dir, data_file, tmp_path, monkeypatch):
    real_save_file = ckpt.save_file
    calls = {"n": 0}

    def crashing_save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's optimizer file: die half-way through writing it
            Path(path).write_bytes(b"half a file")
            raise OSError("disk died")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="disk died"):
        train(_cfg(llama_dir, data_file, tmp_path, max_steps=4, save_every=1), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-1"]
    assert (tmp_path / "checkpoints" / ".tmp-step-2").exists()  # the wreck is there, and ignored
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    resumed = train(loop.resume_config(tmp_path, {}), resume=True, progress=False).summary
    straight = train(_cfg(llama_dir, data_file, tmp_path / "straight", max_steps=4), progress=False).summary
    assert resumed["losses"] == straight["losses"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraforge.cli", "-q", *args]


def _train_flags(llama_dir, data_file, output, steps) -> list[str]:
    return ["train", "--model", str(llama_dir), "--data", str(data_file), "--output", str(output),
            "--max-steps", str(steps), "--batch-size", "2", "--lr", "1e-2", "--r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.1", "--target-modules", "q_proj,v_proj", "--threads", "1", "--dtype", "float32"]


def _wait_for_checkpoint(output: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ckpt.list_checkpoints(output):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(llama_dir, data_file, tmp_path):
    """The promise: a kill -9 at any moment, then --resume, gives the adapter of a run never interrupted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    steps = 150
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_train_flags(llama_dir, data_file, killed, steps), "--save-every", "1"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(killed, proc)
    time.sleep(0.05)  # land somewhere in the middle of a later step or checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists()
    last = ckpt.list_checkpoints(killed)[-1]
    assert 1 <= int(last.name.split("-")[1]) < steps
    straight = subprocess.run(_cli(*_train_flags(llama_dir, data_file, tmp_path / "straight", steps)), env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    resumed = subprocess.run(_cli("train", "--resume", str(killed)), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(tmp_path / "straight", killed)
    assert json.loads((killed / "train_summary.json").read_text())["losses"] == \
        json.loads((tmp_path / "straight" / "train_summary.json").read_text())["losses"]


def test_sigterm_checkpoints_and_says_how_to_resume(llama_dir, data_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*_train_flags(llama_dir, data_file, tmp_path, 100000), "--save-every", "5"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert f"--resume {tmp_path}" in stderr and "SIGTERM" in stderr
    stopped_at = int(ckpt.list_checkpoints(tmp_path)[-1].name.split("-")[1])
    assert stopped_at % 5 != 0 or stopped_at > 5  # a checkpoint of the step it stopped at, not only save_every's


def test_fresh_run_refuses_a_folder_with_checkpoints(llama_dir, data_file, tmp_path):
    train(_cfg(llama_dir, data_file, tmp_path, max_steps=2, save_every=1), progress=False)
    from loraforge.errors import LoraforgeError
    with pytest.raises(LoraforgeError, match="--resume"):
        train(_cfg(llama_dir, data_file, tmp_path, max_steps=2), progress=False)


# ---- numerics ----------------------------------------------------------------------------------------------------
def test_bf16_losses_stay_close_to_fp32(llama_dir, data_file, tmp_path):
    fp32 = train(_cfg(llama_dir, data_file, tmp_path / "fp32", max_steps=5), progress=False).summary["losses"]
    bf16 = train(_cfg(llama_dir, data_file, tmp_path / "bf16", max_steps=5, dtype="bfloat16"),
                 progress=False).summary["losses"]
    assert fp32 != bf16  # it really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 0.02, (fp32, bf16)


def test_gradient_accumulation_equals_one_big_batch(llama_dir, data_file, tmp_path):
    big = train(_cfg(llama_dir, data_file, tmp_path / "big", max_steps=3, batch_size=4, lora_dropout=0.0),
                progress=False).summary["losses"]
    acc = train(_cfg(llama_dir, data_file, tmp_path / "acc", max_steps=3, batch_size=2, grad_accum=2,
                     lora_dropout=0.0), progress=False).summary["losses"]
    assert acc == pytest.approx(big, rel=1e-5)


def test_loss_ignores_masked_tokens():
    model = tiny_llama()
    examples, _ = load_examples(write_jsonl(Path(os.environ.get("TMPDIR", "/tmp")) / "lf_mask.jsonl"),
                                tiny_tokenizer(), max_length=64)
    batch = collate(examples, pad_id=0)
    masked = batch["labels"] == IGNORE_INDEX
    assert masked.any()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    # the loss must not depend on what a masked *label* would have been: compare against a hand-rolled CE
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert causal_lm_loss(model, changed).item() == pytest.approx(by_hand.item(), rel=1e-6)
    total, count = token_loss_sum(model, batch)
    assert count == int(keep.sum())


def test_loraplus_gives_b_matrices_ratio_times_the_lr():
    lm = LoraModel(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer, _ = make_optimizer(lm, lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=16, schedule="constant",
                                  warmup=0, total=10)
    slow, fast = optimizer.param_groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16e-3
    b_ids = {id(layer.lora_B.weight) for layer in lm.layers.values()}
    assert {id(p) for p in fast["params"]} == b_ids
    assert len(slow["params"]) == len(lm.layers)  # the A matrices


def test_schedules_at_pinned_steps():
    cosine, linear, constant = (lr_factor(s, warmup=2, total=10) for s in ("cosine", "linear", "constant"))
    assert [cosine(0), cosine(1)] == [1 / 3, 2 / 3]  # warmup (s+1)/(w+1)
    assert cosine(2) == 1.0 and cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    assert constant(9) == 1.0


# ---- validation, early stopping, files -------------------------------------------------------------------------
def test_validation_best_checkpoint_and_run_files(llama_dir, data_file, tmp_path):
    result = train(_cfg(llama_dir, data_file, tmp_path, max_steps=4, eval_every=2, val_data=str(data_file)),
                   progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in vals)
    best = min(vals, key=lambda r: r["val_loss"])
    s = result.summary
    assert s["best_step"] == best["step"] and s["best_val_loss"] == pytest.approx(best["val_loss"])
    assert (tmp_path / "checkpoints" / "best" / "adapter_model.safetensors").exists()
    _assert_same_adapter(tmp_path / "checkpoints" / "best", tmp_path)  # the final adapter is the best one
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < s["mfu"] < 1 and s["peak_tflops"] > 0 and s["achieved_tflops"] > 0
    steps = [r for r in rows if "loss" in r]
    assert all(0 < r["rss_mb"] <= r["peak_rss_mb"] <= s["peak_rss_mb"] + 1 for r in steps)  # memory per step


def test_release_free_memory_where_glibc():
    import platform

    from loraforge.train.runtime import release_free_memory
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_free_memory() is glibc  # the call exists exactly where glibc does (CI: Linux, glibc)


def test_early_stopping_stops_when_validation_gets_worse(llama_dir, data_file, tmp_path):
    # a learning rate this large makes validation worse after the first evaluation
    s = train(_cfg(llama_dir, data_file, tmp_path, max_steps=30, eval_every=1, early_stopping=2, lr=3.0,
                   val_data=str(data_file), max_grad_norm=0.0), progress=False).summary
    assert s["steps"] < 30
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert min(vals[-2:]) >= min(vals[:-2])  # the last two evaluations did not improve on the best
