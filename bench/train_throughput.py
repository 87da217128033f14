"""loraforge vs PEFT + transformers Trainer: real tokens/s, peak RSS, eval loss and MFU, side by side in one run.

    python bench/train_throughput.py                 # the recorded run (see bench/RESULTS.md)
    python bench/train_throughput.py --steps 5       # a quick look

Both sides get the default model (SmolLM2-135M-Instruct), the same Alpaca-English examples tokenized by the same
code (prompt masked, max_length 256), the same LoRA config (r=16, alpha=32, dropout 0.05; q_proj+v_proj, then
all-linear), AdamW at the same lr with a cosine schedule, and the same number of optimizer steps and batch size.
PEFT runs under transformers' Trainer with its best CPU settings (bf16=True autocast); loraforge with its
defaults (bf16 base stored once, packing). Each run is its own process (peak RSS is per process) and the sides
alternate. Both adapters are then scored by one evaluator (fp32, the same 64 held-out examples).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ALPACA = HERE.parent.parent / "shared" / "data" / "alpaca_zh_en"
N_TRAIN, N_EVAL = 2000, 64


def write_alpaca(folder: Path, source: Path = ALPACA) -> tuple[Path, Path]:
    """English Alpaca records as loraforge instruction JSONL: train from part 0, eval from part 1 (records with an
    empty output, a handful, are left out)."""
    def convert(part: str, n: int, path: Path) -> Path:
        rows = [r for r in json.loads((source / part).read_text(encoding="utf-8")) if r["en_output"].strip()][:n]
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"instruction": r["en_instruction"], "input": r["en_input"],
                                     "output": r["en_output"]}, ensure_ascii=False) + "\n")
        return path
    return (convert("alpaca_chinese_part_0.json", N_TRAIN, folder / "train.jsonl"),
            convert("alpaca_chinese_part_1.json", N_EVAL, folder / "eval.jsonl"))


# ---- workers (each in its own process) -------------------------------------------------------------------------
def run_loraforge(a: argparse.Namespace) -> dict:
    from loraforge.config import DEFAULT_MODEL, TrainConfig
    from loraforge.train import train

    cfg = TrainConfig(model=a.model or DEFAULT_MODEL, data=a.data, output=a.out, r=16, lora_alpha=32,
                      lora_dropout=0.05, target_modules=a.targets, lr=a.lr, max_steps=a.steps, batch_size=a.batch_size,
                      max_length=a.max_length, seed=0, dtype="bfloat16", device=a.device)
    s = train(cfg, progress=False).summary
    peak = s["peak_memory_mb"] if a.device.startswith("cuda") else s["peak_rss_mb"]
    tokens, seconds = s["train_tokens"], s["train_seconds"]
    if a.warmup:  # metrics.jsonl holds the running totals after each step
        from loraforge.config import METRICS_FILE
        after = [json.loads(line) for line in (Path(a.out) / METRICS_FILE).read_text().splitlines()][a.warmup - 1]
        tokens, seconds = tokens - after["tokens"], seconds - after["seconds"]
    return {"tokens": tokens, "seconds": seconds, "peak_rss_mb": peak, "learned_tokens": None,
            "losses": s["losses"]}


def run_peft(a: argparse.Namespace) -> dict:
    import resource

    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from loraforge.data import load_examples
    from loraforge.models import DEFAULT_MODEL, resolve_model

    folder = resolve_model(a.model or DEFAULT_MODEL)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples, _ = load_examples(a.data, tokenizer, a.max_length)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
               for e in examples]
    cuda = a.device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(a.device)
    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    step_tokens: list[int] = []
    base_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = base_collator(features)
        step_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class StepTimer(TrainerCallback):
        seconds: list[float] = []
        losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            StepTimer.seconds.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                StepTimer.losses.append(logs["loss"])

    args = TrainingArguments(output_dir=a.out + "_trainer", per_device_train_batch_size=a.peft_batch_size,
                             train_sampling_strategy=a.peft_sampling,
                             max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0,
                             bf16=True, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    model.save_pretrained(a.out)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": sum(step_tokens[a.warmup:a.steps]), "seconds": sum(StepTimer.seconds[a.warmup:]),
            "peak_rss_mb": peak, "losses": StepTimer.losses}


# ---- the driver ------------------------------------------------------------------------------------------------
def spawn(side: str, targets: str, data: Path, out: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--targets", targets, "--data", str(data), "--out", str(out),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
           "--lr", str(a.lr), "--device", a.device, "--peft-batch-size", str(a.peft_batch_size),
           "--peft-sampling", a.peft_sampling, "--warmup", str(a.warmup)] + (["--model", a.model] if a.model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_loss(adapter: Path, eval_file: Path, max_length: int, model_name: str | None = None) -> float:
    """Both adapters through one evaluator: fp32, loraforge's loss on the response tokens, 64 held-out examples."""
    from loraforge.data import load_examples, pad_id_for
    from loraforge.lora import load_adapter
    from loraforge.models import DEFAULT_MODEL, load_model
    from loraforge.train.loop import evaluate

    model, tokenizer = load_model(model_name or DEFAULT_MODEL)
    load_adapter(model, adapter)
    examples, _ = load_examples(eval_file, tokenizer, max_length)
    return evaluate(model, examples, 8, pad_id_for(tokenizer))


def model_flops(tokens: int, trainable_targets: str, model_name: str | None = None) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.config import parse_targets
    from loraforge.lora import LoraConfig, LoraModel
    from loraforge.models import DEFAULT_MODEL, resolve_model
    from loraforge.train.observe import train_flops

    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model_name or DEFAULT_MODEL)))
    lm = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules=parse_targets(trainable_targets)))
    # every real token counted as passing the head: an upper bound that favours neither side
    return train_flops(model, lm.report().trainable, tokens, tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--peft-batch-size", type=int, help="PEFT's examples a step (default: --batch-size). loraforge "
                   "packs --batch-size rows of --max-length tokens; PEFT pads each example, so a token-matched "
                   "comparison gives it more examples a step")
    p.add_argument("--peft-sampling", default="random", choices=["random", "group_by_length"],
                   help="Trainer's train_sampling_strategy (group_by_length pads less)")
    p.add_argument("--targets", default="q_proj,v_proj;all-linear", help="';'-separated target configs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then the GPU's allocations)")
    p.add_argument("--model", help="a transformers folder (default: the default model)")
    p.add_argument("--alpaca", type=Path, default=ALPACA, help="the alpaca_zh_en data folder")
    p.add_argument("--warmup", type=int, default=0, help="leave the first N steps out of the timing, both sides "
                   "(a GPU's first steps warm up cuBLAS and the allocator)")
    p.add_argument("--no-eval", action="store_true", help="skip the eval loss (models with random weights)")
    p.add_argument("--worker", choices=["loraforge", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.peft_batch_size = a.peft_batch_size or a.batch_size
    if a.worker:
        result = (run_loraforge if a.worker == "loraforge" else run_peft)(a)
        print(json.dumps(result))
        return

    from loraforge.train.observe import measure_matmul_peak

    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_"))
    train_file, eval_file = write_alpaca(tmp, a.alpaca)
    peak_bf16 = measure_matmul_peak(torch.bfloat16, seconds=2.0, device=a.device)
    peak_fp32 = measure_matmul_peak(torch.float32, seconds=2.0, device=a.device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# measured matmul peak (1024^3, this run): bf16 {peak_bf16 / 1e12:.3f} TFLOP/s, "
          f"fp32 {peak_fp32 / 1e12:.3f} TFLOP/s")
    print(f"# {a.steps} steps x batch {a.batch_size}, max_length {a.max_length}, lr {a.lr}, "
          f"Alpaca-en {N_TRAIN} train / {N_EVAL} eval; PEFT: {a.peft_batch_size} examples a step, "
          f"{a.peft_sampling} sampling\n")
    rows = []
    for targets in a.targets.split(";"):
        results = {}
        for side in ("loraforge", "peft"):  # alternate: one side, then the other, for each config
            out = tmp / f"{side}-{targets.replace(',', '+')}"
            results[side] = spawn(side, targets, train_file, out, a)
            results[side]["eval_loss"] = float("nan") if a.no_eval else eval_loss(out, eval_file, a.max_length,
                                                                                    a.model)
            r = results[side]
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
            r["mfu_bf16"] = model_flops(r["tokens"], targets, a.model) / r["seconds"] / peak_bf16
            print(f"{targets:<16} {side:<10} {r['tokens']:>7} real tokens in {r['seconds']:7.1f} s = "
                  f"{r['tokens_per_second']:7.1f} tok/s | peak mem {r['peak_rss_mb']:6.0f} MB | eval loss "
                  f"{r['eval_loss']:.4f} | MFU {100 * r['mfu_bf16']:.1f}% of bf16 peak", flush=True)
        lf, pf = results["loraforge"], results["peft"]
        rows.append((targets, lf, pf))
    print("\n| targets | tok/s loraforge | tok/s PEFT | speed ratio | mem loraforge MB | mem PEFT MB | mem ratio "
          "| eval loss loraforge | eval loss PEFT | MFU loraforge | MFU PEFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for targets, lf, pf in rows:
        print(f"| {targets} | {lf['tokens_per_second']:.1f} | {pf['tokens_per_second']:.1f} | "
              f"**{lf['tokens_per_second'] / pf['tokens_per_second']:.2f}x** | {lf['peak_rss_mb']:.0f} | "
              f"{pf['peak_rss_mb']:.0f} | **{lf['peak_rss_mb'] / pf['peak_rss_mb']:.2f}x** | "
              f"{lf['eval_loss']:.4f} | {pf['eval_loss']:.4f} | {100 * lf['mfu_bf16']:.1f}% | "
              f"{100 * pf['mfu_bf16']:.1f}% |")


if __name__ == "__main__":
    main()
