"""What a run shows and leaves behind: metrics.jsonl, the loss-curve PNG, FLOP and MFU estimates, the summary."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from torch import nn

from loraforge.config import METRICS_FILE  # noqa: F401  (re-exported: train writes it)
from loraforge.quant.linear import QuantLinear
PLOT_FILE = "loss_curve.png"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    """Resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the checkpoint's step are dropped so the curve has no repeats."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, **row: float | int | str) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(rows: list[dict], png: Path, title: str) -> Path:
    """Train loss per step and validation loss per evaluation, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per learned token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def train_flops(model: nn.Module, trainable: int, tokens: int, learned_tokens: int) -> float:
    """FLOPs of LoRA training with a frozen base: forward 2N, backward 2N (activation gradients only) per token.

    N counts the matmul weights a token passes through (a packed base's too); the embedding lookup is free, and the output head runs
    only on learned tokens (see loss.py). LoRA's own weights cost 6 per parameter per token (they also get weight
    gradients). Full fine-tuning would cost 6N. Attention's T^2 term is left out (small at T <= 512 for these
    models), so the MFU derived from this is conservative.
    """
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()} - head_ids
    seen: set[int] = set()
    body = head_n = 0
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2 or id(p) in embed_ids:
            continue
        seen.add(id(p))
        if id(p) in head_ids:
            head_n += p.numel()
        else:
            body += p.numel()
    body -= trainable  # LoRA's weights are in model.parameters() too
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]  # packed: not parameters
    body += sum(m.num_weights for m in packed if m is not head)
    head_n += head.num_weights if isinstance(head, QuantLinear) else 0
    return tokens * (4.0 * body + 6.0 * trainable) + learned_tokens * 4.0 * head_n


def measure_matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5,
                        device: torch.device | str = "cpu") -> float:
    """Sustained FLOP/s of a square matmul in `dtype` on `device`, now: the peak MFU is measured against (a GPU
    gets a larger matrix, so that it is busy)."""
    device = torch.device(device)
    size = 8192 if device.type == "cuda" else size
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN or cuBLAS picks its kernel)
    _sync(device)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        torch.mm(a, b)
        runs += 1
        _sync(device)
    return 2.0 * size**3 * runs / elapsed


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory of this process's work: `torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_screen(summary: dict) -> str:
    """The one-screen summary printed at the end of a run."""
    s = summary
    lines = [
        f"steps {s['steps']}  |  final loss {s['final_loss']:.4f}"
        + (f"  |  best val loss {s['best_val_loss']:.4f} (step {s['best_step']})" if s.get("best_val_loss") else ""),
        f"tokens {s['train_tokens']:,} real in {s['train_seconds']:.1f} s = {s['tokens_per_second']:.0f} tokens/s",
        f"compute {s['achieved_tflops']:.3f} TFLOP/s = MFU {100 * s['mfu']:.1f}% of the measured "
        f"{s['peak_tflops']:.2f} TFLOP/s {s['dtype']} matmul peak",
        f"trainable {s['trainable_params']:,} params ({s['trainable_percent']:.3f}%)  |  peak RSS "
        f"{s['peak_rss_mb']:.0f} MB",
        f"data: {s['data']['records_read']} records read, {s['data']['used']} used, {s['data']['skipped']} skipped, "
        f"{s['data']['truncated']} truncated",
    ]
    width = max(len(line) for line in lines)
    return "\n".join(["=" * width, *lines, "=" * width])
