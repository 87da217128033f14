"""Per-user adapters on real data: six users, each its own domain and task (examples/prepare_users.py), 160 training
and 40 held-out records each. For each user, held-out perplexity (over the response tokens, as training learns them)
of (a) the base model, (b) one shared adapter trained on all users' records with the same total steps, (c) the
user's own adapter, and (c) again with every user's rows in one mixed batch, each row on its own adapter.

    python bench/per_user.py                  # the recorded run (bench/RESULTS.md), ~25 min on 2 cores
    python bench/per_user.py --steps 4        # a quick look

Training: `loraforge train --per-user user` (base loaded and data tokenized once) with r=16, alpha=32 on every linear
layer, lr 1e-3 with 3 warmup steps and a cosine schedule, 4 packed rows of 512 tokens a step, `--steps` steps per
user; the shared adapter gets 6 x `--steps` steps on the whole file with the same settings.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
USERS = ("legal", "medical", "e2e", "dialogsum", "scitldr", "zh")


def train_all(args: argparse.Namespace, data: Path, out: Path) -> dict[str, float]:
    from loraforge.config import TrainConfig
    from loraforge.train import train

    common = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", lr=1e-3, warmup_steps=3,
                  batch_size=4, max_length=512, seed=0, dtype="auto")
    seconds = {}
    start = time.perf_counter()
    train(TrainConfig(data=str(data), output=str(out / "users"), per_user="user", max_steps=args.steps, **common),
          progress=False)
    seconds["per-user (6 adapters)"] = time.perf_counter() - start
    start = time.perf_counter()
    train(TrainConfig(data=str(data), output=str(out / "shared"), max_steps=len(USERS) * args.steps, **common),
          progress=False)
    seconds["shared"] = time.perf_counter() - start
    return seconds


@torch.no_grad()
def nll(session, examples: list, names: list[str | None], batch_size: int) -> tuple[list[float], list[int]]:
    """Summed NLL and token count of each example, row i on adapter names[i] (mixed batches)."""
    from loraforge.data import collate, pad_id_for
    from loraforge.infer.score import token_nll

    sums, counts = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id_for(session.tokenizer))
        session.route(names[start:start + batch_size])
        s, c = token_nll(session.model, batch)
        sums += s.tolist()
        counts += c.tolist()
    session.route(None)
    return sums, counts


def evaluate(args: argparse.Namespace, out: Path, heldout: Path) -> dict:
    from loraforge.data import load_examples
    from loraforge.infer import InferenceSession

    session = InferenceSession.open("smollm2-135m-instruct", {"shared": out / "shared",
                                                               **{u: out / "users" / u for u in USERS}})
    examples = {u: load_examples(heldout / f"{u}.jsonl", session.tokenizer, 512)[0] for u in USERS}
    table = {}
    for user in USERS:
        row = {}
        for system, name in (("base", None), ("shared", "shared"), ("own", user)):
            s, c = nll(session, examples[user], [name] * len(examples[user]), args.batch_size)
            row[system] = math.exp(sum(s) / sum(c))
        row["tokens"] = sum(c)
        table[user] = row
    # every user's rows interleaved, so each batch holds several users, each row on its own adapter
    order = [(u, i) for i in range(max(len(e) for e in examples.values())) for u in USERS if i < len(examples[u])]
    mixed = [examples[u][i] for u, i in order]
    s, c = nll(session, mixed, [u for u, _ in order], args.batch_size)
    for user in USERS:
        rows = [k for k, (u, _) in enumerate(order) if u == user]
        table[user]["own, mixed batch"] = math.exp(sum(s[k] for k in rows) / sum(c[k] for k in rows))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per user")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per evaluation batch")
    parser.add_argument("--output", default=str(ROOT / "runs" / "per_user"))
    args = parser.parse_args()
    out = Path(args.output)
    data = ROOT / "runs" / "data" / "users"
    subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_users.py"), "--output", str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = train_all(args, data / "train.jsonl", out)
    table = evaluate(args, out, data / "heldout")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "seconds": seconds, "users": table},
                                                 indent=2) + "\n")
    print(f"\n## held-out perplexity per user ({args.steps} steps per user adapter, {len(USERS) * args.steps} for the "
          "shared one; lower is better)")
    print("| user | tokens | base | shared adapter | own adapter | own, in a mixed batch of all users |")
    print("|---|---|---|---|---|---|")
    for user, r in table.items():
        print(f"| {user} | {r['tokens']} | {r['base']:.2f} | {r['shared']:.2f} | {r['own']:.2f} | "
              f"{r['own, mixed batch']:.2f} |")
    worst = max(abs(r["own, mixed batch"] / r["own"] - 1) for r in table.values())
    print(f"\nmixed batch vs own adapter alone: largest relative difference {worst:.1e}")
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
