"""Regenerate tests/golden/tiny_llama_losses.json: the loss of each of 5 training steps on the tiny seeded Llama.

Run from the repository root:  python tests/golden/make_golden.py
Only rerun it when a change to the numbers is intended (new init, new loss, new data order), and say why in the
commit: the test compares against this file at a relative tolerance of 1e-5.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for fixtures.tiny_models

import torch  # noqa: E402
import transformers  # noqa: E402

from fixtures.tiny_models import save_tiny_llama, write_jsonl  # noqa: E402
from loraforge.config import TrainConfig  # noqa: E402
from loraforge.train import train  # noqa: E402

GOLDEN_FILE = HERE / "tiny_llama_losses.json"
MODEL_SEED = 0
# The options of the golden run, besides model/data/output (temporary folders).
# The padded path (packing off) and the default packed path (rows of at most 32 tokens: several rows).
OPTIONS = dict(max_steps=5, batch_size=2, lr=1e-2, seed=0, r=4, lora_alpha=8, lora_dropout=0.0, packing=False,
               dtype="float32")
PACKED_OPTIONS = {**OPTIONS, "packing": True, "max_length": 32}
# QLoRA: the base's linear layers packed as NF4 (pure torch, bitsandbytes' bytes), LoRA on all of them.
NF4_OPTIONS = {**OPTIONS, "quantize": "nf4", "target_modules": "all-linear"}


def run(folder: Path, options: dict) -> list[float]:
    model = save_tiny_llama(folder / "model", seed=MODEL_SEED)
    data = write_jsonl(folder / "data.jsonl")
    cfg = TrainConfig(model=str(model), data=str(data), output=str(folder / "out"), **options)
    return train(cfg, progress=False).summary["losses"]


def main() -> None:
    torch.set_num_threads(1)  # as the test runs it
    with tempfile.TemporaryDirectory() as tmp:
        losses = run(Path(tmp) / "padded", OPTIONS)
        packed_losses = run(Path(tmp) / "packed", PACKED_OPTIONS)
        nf4_losses = run(Path(tmp) / "nf4", NF4_OPTIONS)
    golden = {
        "command": "python tests/golden/make_golden.py",
        "what": "train() on fixtures.tiny_models.save_tiny_llama(seed=0) and RECORDS; summary['losses']",
        "model_seed": MODEL_SEED,
        "options": OPTIONS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "losses": losses,
        "packed_options": PACKED_OPTIONS,
        "packed_losses": packed_losses,
        "nf4_options": NF4_OPTIONS,
        "nf4_losses": nf4_losses,
    }
    GOLDEN_FILE.write_text(json.dumps(golden, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN_FILE}: {losses}")


if __name__ == "__main__":
    main()
