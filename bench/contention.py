"""Training while another job holds a core: step time shared against idle, for the thread settings in question.

    python bench/contention.py              # the recorded run (bench/RESULTS.md)
    python bench/contention.py --steps 4    # a quick look

Each variant trains the demo's setup (default model, the bundled E2E sample, r=16 on every linear layer, batch 8)
for `--steps` steps in a fresh process, once on an idle machine and once next to a busy loop (one Python process
spinning, as another job on the same laptop would), and reports the median step time of steps 2.. (the first
step warms up). The goal: sharing the machine costs at most 2.5x the idle step time.

Variants: a fixed thread per core (torch's default, libgomp's default wait policy), loraforge's default (threads
follow the CPUs other processes leave free: `train.runtime.CpuShare`), the fixed count with OMP_WAIT_POLICY=PASSIVE
(threads sleep at a barrier instead of spinning), and one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORES = len(os.sched_getaffinity(0))
VARIANTS = {  # label: (environment, extra flags)
    f"fixed {CORES} threads (torch's default)": ({}, ["--threads", str(CORES)]),
    "loraforge's default: threads follow the free CPUs": ({}, []),
    f"fixed {CORES} threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", str(CORES)]),
    "fixed 1 thread": ({}, ["--threads", "1"]),
}


def demo_train_command(out: Path, steps: int, *flags: str) -> list[str]:
    """`loraforge train` on the demo's data and LoRA setup, for `steps` steps into `out`, with `flags` added (the
    benchmarks that train the demo's setup share it: this one and bench/distributed.py)."""
    from loraforge.demo import sample_path

    return [sys.executable, "-m", "loraforge", "-q", "train", "--data", str(sample_path("e2e_demo.jsonl")),
            "--output", str(out), "--max-steps", str(steps), "--batch-size", "8", "--r", "16", "--lora-alpha", "32",
            "--target-modules", "all-linear", "--lr", "1e-3", "--max-length", "128", "--seed", "0", *flags]


def one_run(env: dict[str, str], flags: list[str], steps: int, out: Path) -> float:
    """Median seconds per step (steps 2..) of a short training run in a fresh process."""
    subprocess.run(demo_train_command(out, steps, *flags), check=True, env={**os.environ, **env},
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [row["seconds"] for row in rows if "loss" in row]
    return statistics.median(b - a for a, b in zip(seconds[:-1], seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, CPUs this process may use: {len(os.sched_getaffinity(0))}")
    tmp = Path(tempfile.mkdtemp(prefix="contention_"))
    results = {}
    for label, (env, flags) in VARIANTS.items():
        idle = one_run(env, flags, args.steps, tmp / f"{len(results)}-idle")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            shared = one_run(env, flags, args.steps, tmp / f"{len(results)}-shared")
        finally:
            hog.kill()
            hog.wait()
        results[label] = (idle, shared)
    print("\n| threads | idle s/step | one core busy s/step | shared / idle |")
    print("|---|---|---|---|")
    for label, (idle, shared) in results.items():
        print(f"| {label} | {idle:.2f} | {shared:.2f} | {shared / idle:.2f}x |")
    base_idle = next(iter(results.values()))[0]
    for label, (idle, shared) in results.items():
        print(f"{label}: shared {shared / base_idle:.2f}x the idle step of torch's default (goal <= 2.5x)")


if __name__ == "__main__":
    main()
