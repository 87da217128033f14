"""One process against two (torchrun, gloo, DDP and FSDP2) on this machine, 1 thread each: tokens/s and the loss curve.

    python bench/distributed.py              # the recorded run (bench/RESULTS.md)
    python bench/distributed.py --steps 4    # a quick look

The demo's setup (default model, the bundled E2E sample, r=16 on every linear layer, global batch 8, max length 128,
fp32, dropout 0 so that the runs can agree), `--steps` steps. On a 2-core machine this shows what the machinery
costs (all-reduces, the global-batch split, rank-0 writes), not a speed-up to claim: the two processes share the
cores one process with one thread leaves idle.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contention import demo_train_command  # noqa: E402  (the demo's training command, shared)


def run(out: Path, steps: int, nproc: int, strategy: str = "ddp") -> dict:
    cmd = demo_train_command(out, steps, "--dtype", "float32", "--lora-dropout", "0", "--threads", "1", "--nproc",
                             str(nproc), "--strategy", strategy)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return json.loads((out / "train_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; 1 torch thread per process")
    tmp = Path(tempfile.mkdtemp(prefix="distributed_"))
    one = run(tmp / "one", args.steps, 1)
    runs = {"2 processes, DDP": run(tmp / "ddp", args.steps, 2, "ddp"),
            "2 processes, FSDP2": run(tmp / "fsdp", args.steps, 2, "fsdp")}
    print("\n| run | tokens/s | vs 1 process | final loss | max loss difference from 1 process |")
    print("|---|---|---|---|---|")
    print(f"| 1 process | {one['tokens_per_second']:.1f} | 1.00x | {one['final_loss']:.4f} | - |")
    for label, s in runs.items():
        diff = max(abs(a - b) for a, b in zip(s["losses"], one["losses"]))
        print(f"| {label} | {s['tokens_per_second']:.1f} | {s['tokens_per_second'] / one['tokens_per_second']:.2f}x"
              f" | {s['final_loss']:.4f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
