"""Training under torch.distributed on the CPU, two gloo processes against one process on the same global batch:
step-1 LoRA gradients (DDP and FSDP2), the 5-step loss curve and the saved adapter through torchrun, world size 1
under torchrun bit for bit, and `--compile` tracing the whole loss."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from loraforge.cli import main
from loraforge.config import TrainConfig
from loraforge.train import loop, train

STEPS = ["--max-steps", "5", "--batch-size", "4", "--r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--seed", "0",
         "--dtype", "float32", "--max-length", "32", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj"]


def _cfg(model: Path, data: Path, output: Path, **kw) -> TrainConfig:
    options = dict(model=str(model), data=str(data), output=str(output), max_steps=5, batch_size=4, r=4,
                   lora_alpha=8, lr=1e-2, seed=0, dtype="float32", max_length=32, lora_dropout=0.0,
                   target_modules=["q_proj", "v_proj"], threads=1)
    return TrainConfig(**{**options, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step1_grads(rank: int, world: int, port: int, options: dict, out: str) -> None:
    """One rank of a run of one step; rank 0 writes the gradients the optimizer saw, in parameter order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: list[torch.Tensor] = []
    real = torch.optim.AdamW.step

    def spy(self, *args, **kw):
        if not seen:
            seen.extend(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.detach().clone()
                        for group in self.param_groups for p in group["params"])  # FSDP2: gather the shards
        return real(self, *args, **kw)
    torch.optim.AdamW.step = spy
    try:
        train(TrainConfig(**options), progress=False)
    finally:
        torch.optim.AdamW.step = real
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        save_file({f"g{i}": g.contiguous() for i, g in enumerate(seen)}, out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_step1_gradients_of_two_processes_equal_one_process(llama_dir, data_file, tmp_path, strategy):
    options = _cfg(llama_dir, data_file, tmp_path / "x", max_steps=1, max_grad_norm=0.0, strategy=strategy).to_dict()
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    mp.spawn(_step1_grads, args=(1, _free_port(), {**options, "output": str(tmp_path / "o1")}, str(one)), nprocs=1)
    mp.spawn(_step1_grads, args=(2, _free_port(), {**options, "output": str(tmp_path / "o2")}, str(two)), nprocs=2)
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys() and len(a) == 8  # q and v, A and B, in 2 layers
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert max(float(t.abs().max()) for t in a.values()) > 1e-3  # real gradients, not zeros that match anything


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(llama_dir, data_file, tmp_path, strategy):
    one = train(_cfg(llama_dir, data_file, tmp_path / "one"), progress=False).summary
    assert main(["-q", "train", "--nproc", "2", "--model", str(llama_dir), "--data", str(data_file), "--output",
                 str(tmp_path / "two"), "--strategy", strategy, *STEPS]) == 0
    two = json.loads((tmp_path / "two" / loop.SUMMARY_FILE).read_text())
    assert two["world_size"] == 2 and two["steps"] == 5
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    assert one["losses"][-1] < one["losses"][0] - 0.02  # it learned: the curves compared are not flat
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_world_size_1_under_torchrun_is_the_plain_loop_bit_for_bit(llama_dir, data_file, tmp_path, monkeypatch):
    plain = train(_cfg(llama_dir, data_file, tmp_path / "plain"), progress=False).summary
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    ranked = train(_cfg(llama_dir, data_file, tmp_path / "ranked"), progress=False).summary
    assert ranked["losses"] == plain["losses"]
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "ranked"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_global_batch_must_divide_by_the_processes(llama_dir, data_file, tmp_path, capsys):
    assert main(["train", "--nproc", "3", "--model", str(llama_dir), "--data", str(data_file), "--output",
                 str(tmp_path / "o"), *STEPS]) == 2
    assert "--batch-size 4 is the global batch" in capsys.readouterr().err


def test_compile_traces_the_whole_loss(llama_dir, data_file, tmp_path, monkeypatch):
    """--compile goes through the loss module: the traced graphs hold the LoRA layers, the head and the loss."""
    traced: list[set[str]] = []

    def counting(gm, example_inputs):
        traced.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward
    monkeypatch.setattr(loop, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    summary = train(_cfg(llama_dir, data_file, tmp_path / "c", max_steps=2, compile=True), progress=False).summary
    plain = train(_cfg(llama_dir, data_file, tmp_path / "p", max_steps=2), progress=False).summary
    torch._dynamo.reset()
    ops = set().union(*traced)
    assert traced, "torch.compile traced nothing: the loop bypassed the compiled module"
    # the head's weight, the labels and the fused cross-entropy (an autograd.Function) were traced: the loss ran
    # inside the compiled module, not beside it
    assert any("lm_head" in op for op in ops) and any("labels" in op for op in ops), ops
    assert "autograd_function_apply" in ops and any("lora_A" in op for op in ops), ops
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=1e-5)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_9_of_one_rank_then_resume_reproduces_the_uninterrupted_run(llama_dir, data_file, tmp_path, strategy):
    long = ["--max-steps", "60", "--save-every", "2", "--lr", "1e-3", "--strategy", strategy]
    flags = ["--model", str(llama_dir), "--data", str(data_file), *STEPS, *long]
    assert main(["-q", "train", "--nproc", "2", "--output", str(tmp_path / "straight"), *flags]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "-q", "train", "--nproc", "2", "--output", str(cut),
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step-4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    workers = [w for t in _children(proc.pid) for w in _children(t)]  # loraforge -> torchrun -> 2 ranks
    assert len(workers) == 2 and proc.poll() is None, "the run ended before it could be killed"
    os.kill(workers[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not (cut / loop.SUMMARY_FILE).exists()
    assert main(["-q", "train", "--nproc", "2", "--resume", str(cut)]) == 0
    a, b = (json.loads((tmp_path / name / loop.SUMMARY_FILE).read_text()) for name in ("straight", "cut"))
    assert len(b["losses"]) == 60
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=0, atol=1e-6)
    x, y = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("straight", "cut"))
    assert all(torch.equal(x[k], y[k]) for k in x)
