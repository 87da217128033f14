"""`make demo`: fine-tune the default model on the bundled E2E sample, then show base and tuned answers side by side."""
from __future__ import annotations

import json
import shutil
import textwrap
import time
from importlib import resources
from pathlib import Path

from loraforge.config import DEFAULT_MODEL, TrainConfig
from loraforge.data import encode_prompt
from loraforge.infer import InferenceSession, SamplingParams, generate_many
from loraforge.train import train

COLUMN = 58


def sample_path(name: str) -> Path:
    return Path(str(resources.files("loraforge") / "sample_data" / name))


def demo_config(steps: int, output: Path) -> TrainConfig:
    """The demo's settings: a few minutes on 2 CPU cores (LoRA on every linear layer; the compute dtype auto: bf16
    where the CPU has native bf16 matmuls, else fp32)."""
    return TrainConfig(model=DEFAULT_MODEL, data=str(sample_path("e2e_demo.jsonl")), output=str(output),
                       r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", lr=1e-3,
                       warmup_steps=5, max_steps=steps, batch_size=8, max_length=128, seed=0)


def side_by_side(title: str, left: str, right: str) -> str:
    lines = [title, f"  {'BASE MODEL':<{COLUMN}} | FINE-TUNED", f"  {'-' * COLUMN}-+-{'-' * COLUMN}"]
    a, b = textwrap.wrap(left, COLUMN) or [""], textwrap.wrap(right, COLUMN) or [""]
    for i in range(max(len(a), len(b))):
        lines.append(f"  {a[i] if i < len(a) else '':<{COLUMN}} | {b[i] if i < len(b) else ''}")
    return "\n".join(lines)


def run_demo(steps: int = 40, output: Path = Path("runs/demo")) -> None:
    start = time.perf_counter()
    if output.exists():
        shutil.rmtree(output)
    result = train(demo_config(steps, output))
    # The trained base serves on: the LoRA layers come out, and the adapter goes back in from its file, as a user's
    # would, beside the base in one session; base and tuned answers decode in one mixed batch.
    session = InferenceSession(result.lora.unload(), result.tokenizer, base=DEFAULT_MODEL)
    session.add_adapter("tuned", output)
    tokenizer = session.tokenizer
    prompts = [json.loads(line) for line in sample_path("e2e_demo_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    s = result.summary
    print(f"\nTrained {s['steps']} steps on {s['data']['used']} E2E records in {s['train_seconds']:.0f} s "
          f"({s['tokens_per_second']:.0f} tokens/s); loss {s['losses'][0]:.3f} -> {s['final_loss']:.3f}; "
          f"{s['trainable_params']:,} trainable parameters ({s['trainable_percent']:.2f}%).\n")
    ids = [encode_prompt(record["instruction"], record["input"], tokenizer) for record in prompts]
    outputs = generate_many(session, ids + ids, SamplingParams(max_new_tokens=60),
                            [None] * len(ids) + ["tuned"] * len(ids))
    texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
    for i, record in enumerate(prompts, 1):
        print(side_by_side(f"[{i}] {record['input']}", texts[i - 1], texts[len(ids) + i - 1]))
        print(f"  reference: {record['references'][0]}\n")
    print(f"Adapter (PEFT format) in {output}/. Demo wall time {time.perf_counter() - start:.0f} s.")
    last = prompts[-1]
    print(f"Try it: loraforge generate --adapter {output} --chat --greedy "
          f"--prompt $'{last['instruction']}\\n\\n{last['input']}'")
