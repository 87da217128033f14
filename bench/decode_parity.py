"""Does this checkout decode an E2E adapter to the same text as an older one? Beam search on the first N dev MRs.

    git worktree add /tmp/loraforge-old 85706c8        # the commit before the inference engine
    python bench/decode_parity.py --adapter runs/e2e_check --out runs/e2e_check/new.json
    PYTHONPATH=/tmp/loraforge-old/src python bench/decode_parity.py --bench /tmp/loraforge-old/bench \\
        --adapter runs/e2e_check --out runs/e2e_check/old.json
    python bench/decode_parity.py --compare runs/e2e_check/old.json runs/e2e_check/new.json

Each run loads the default model and the adapter the way its checkout does (an `InferenceSession` with the adapter
routed to every row, or `load_adapter` on the base before it) and decodes with `bench/e2e_lora.py`'s `decode` of the
given bench folder: beam 4, length penalty 1.0, 80 new tokens, batches of 16, the e2e recipe's plain prompt.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> None:
    spec = importlib.util.spec_from_file_location("e2e_lora", Path(args.bench) / "e2e_lora.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    records = [g[0] for g in e2e.dev_groups(args.mrs)]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        from loraforge.infer import InferenceSession
    except ImportError:  # an older checkout: the base with the adapter injected in place
        from loraforge.lora import load_adapter
        from loraforge.models import DEFAULT_MODEL, load_model

        model, tokenizer = load_model(DEFAULT_MODEL, dtype=dtype)
        load_adapter(model, args.adapter)
        model.eval()
        texts = e2e.decode(model, tokenizer, records, args.beams, 16)
    else:
        session = InferenceSession.open("smollm2-135m-instruct", {"e2e": args.adapter}, dtype=args.dtype)
        with session.use("e2e") as model:
            texts = e2e.decode(model, session.tokenizer, records, args.beams, 16)
    Path(args.out).write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(texts)} texts written to {args.out}")


def compare(old: str, new: str) -> None:
    a, b = json.loads(Path(old).read_text()), json.loads(Path(new).read_text())
    same = sum(x == y for x, y in zip(a, b))
    print(f"{same}/{len(a)} texts identical")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            print(f"  MR {i}:\n    old: {x}\n    new: {y}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter")
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parent), help="folder of e2e_lora.py")
    parser.add_argument("--mrs", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
