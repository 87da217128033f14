"""QLoRA against LoRA on one CPU: base bytes, peak RSS, step time, eval loss and E2E BLEU, in one run.

    python bench/qlora.py                  # the recorded run (bench/RESULTS.md, "QLoRA")
    python bench/qlora.py --steps 3 --eval-mrs 8 --big-steps 1      # a quick look
    python bench/qlora.py --only "lora fp32 + PiSSA,qlora nf4 + LoftQ T=3"   # some rows against the reference

Part 1, the default model (SmolLM2-135M-Instruct), LoRA r=16 alpha 32 on all linear layers, the E2E recipe, the same
seed, data order and steps for every row: the dense fp32 base (this CPU has no native bf16: its bf16 matmul runs at
~1 GFLOP/s against ~175 in fp32, so fp32 is the dense reference here), and the base packed as nf4, nf4-dq, the GGUF
file's own Q4_1 blocks (gguf), nf4 with LoftQ's start (one alternation, and three: the packed base then moves, and
is saved beside the adapter), the dense base under PiSSA's start, and nf4-all (the embedding and head packed too).
Each row is its own process. Peak RSS is read from /proc/self/status (VmHWM) after it was reset once the base was
loaded and packed (loading goes through the dense weights, the training after it does not: that is the number QLoRA
changes). Step time is the median over steps after the first. The eval loss is on the first 200 rows of the E2E dev
split. Then the dense adapter and the best packed one decode the first `--eval-mrs` dev MRs greedily, scored with
BLEU against all their references.

Part 2, a 1B-class Llama (TinyLlama-1.1B's shape, random weights, seeded), LoRA r=16 on all linear layers, batch 1 x
256 tokens, `--big-steps` AdamW steps (`--big-only`: this part alone): peak RSS of fp32 LoRA and of nf4 / nf4-dq
QLoRA computing in fp32 (reset after building), and of bf16 LoRA. Where the CPU runs bf16 matmuls natively
(AVX512-BF16 or AMX), bf16 LoRA trains on 256 tokens too, and nf4 / nf4-dq also run with bf16 compute (the QLoRA
paper's setting: the packed base dequantized to bf16), and again with gradient checkpointing (`-ckpt` rows, each
against bf16 LoRA with checkpointing too; QLoRA's paper trains with it), each also as nf4-all / nf4-dq-all (the
embedding and head packed too: 262 MB in bf16 on this shape, more than the packed body's half). Elsewhere bf16 is
emulated (~1 GFLOP/s: 256 tokens would take an hour), so bf16 LoRA runs on `--bf16-tokens` tokens only: fewer
activations, a lower bound of its peak at 256 tokens, which makes the ratio against it pessimistic for QLoRA.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraforge.config import resolve_dtype

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
E2E = HERE.parent.parent / "shared" / "data" / "e2e"
ROWS = [("lora fp32", "none", "default", 1), ("qlora nf4", "nf4", "default", 1),
        ("qlora nf4-dq", "nf4-dq", "default", 1), ("qlora gguf (Q4_1 blocks)", "gguf", "default", 1),
        ("qlora nf4 + LoftQ", "nf4", "loftq", 1), ("qlora nf4 + LoftQ T=3", "nf4", "loftq", 3),
        ("lora fp32 + PiSSA", "none", "pissa", 1), ("qlora nf4-all (embedding and head packed too)", "nf4-all",
                                                     "default", 1)]  # (name, --quantize, --lora-init, --loftq-iter)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> float:
    """Hand freed heap pages back, reset the peak RSS to the current RSS (Linux clear_refs 5); the RSS now."""
    from loraforge.train.runtime import release_free_memory

    release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return vm_hwm_mb()


def linear_bytes(model) -> int:
    """Bytes of the body's linear weights, packed or dense (not the output head)."""
    from loraforge.quant.linear import QuantLinear
    from loraforge.quant.model import body_linears

    head = model.get_output_embeddings()
    packed = sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear) and m is not head)
    dense = sum(model.get_submodule(p).weight.numel() * model.get_submodule(p).weight.element_size()
                for p in body_linears(model))
    return packed + dense


def embedding_head_bytes(model) -> int:
    """Bytes of the input embedding and output head, packed or dense (a tied pair once)."""
    from loraforge.quant.linear import weight_count

    holder = torch.nn.ModuleList([model.get_input_embeddings(), model.get_output_embeddings()])
    return weight_count(holder)[1]


# ---- workers (each in its own process) -------------------------------------------------------------------------
def worker_train(a: argparse.Namespace) -> dict:
    from loraforge.config import DEFAULT_MODEL, METRICS_FILE, TrainConfig
    from loraforge.train import loop, train

    seen: dict = {}
    real_load = loop.load_model

    def load_then_reset(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        seen["rss_after_load_mb"] = reset_peak()
        seen["model"] = model
        return model, tokenizer

    loop.load_model = load_then_reset
    cfg = TrainConfig(model=DEFAULT_MODEL, data=str(E2E / "trainset.csv"), val_data=a.dev, recipe="e2e",
                      output=a.out, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", lr=2e-4,
                      warmup_steps=2, max_steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, seed=0,
                      dtype="float32", quantize=a.quantize, lora_init=a.init, loftq_iter=a.loftq_iter,
                      max_examples=4000, overwrite=True)
    s = train(cfg, progress=False).summary
    peak = vm_hwm_mb()
    rows = [json.loads(line) for line in (Path(a.out) / METRICS_FILE).read_text().splitlines() if '"loss"' in line]
    times = [b["seconds"] - p["seconds"] for p, b in zip(rows, rows[1:])]
    return {"base_linear_bytes": linear_bytes(seen["model"]), "rss_after_load_mb": seen["rss_after_load_mb"],
            "peak_rss_training_mb": peak, "step_seconds": statistics.median(times) if times else s["train_seconds"],
            "tokens_per_step": s["train_tokens"] / s["steps"], "first_loss": s["losses"][0],
            "final_loss": s["final_loss"], "val_loss": s["best_val_loss"], "steps": s["steps"]}


def worker_bleu(a: argparse.Namespace) -> dict:
    from e2e_lora import decode, dev_groups, score

    from loraforge.infer import InferenceSession
    from loraforge.models import DEFAULT_MODEL

    session = InferenceSession.open(DEFAULT_MODEL, {"e2e": a.out}, quantize=a.quantize)
    groups = dev_groups(a.eval_mrs)
    start = time.perf_counter()
    with session.use("e2e") as model:
        predictions = decode(model, session.tokenizer, [g[0] for g in groups], 1, 16)
    return {"BLEU": score(predictions, [g[1] for g in groups])["BLEU"], "decode_seconds": time.perf_counter() - start,
            "sample": predictions[:2]}


def worker_big(a: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.lora import LoraConfig, LoraModel
    from loraforge.quant.model import quantize_model
    from loraforge.train.loss import CausalLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    checkpointing = a.quantize.endswith("-ckpt")
    q = a.quantize.removesuffix("-ckpt")
    dtype = torch.bfloat16 if q.endswith("bf16") else torch.float32
    method = q.removesuffix("bf16").rstrip("-")
    model = LlamaForCausalLM(config).to(dtype).eval()
    if method.startswith("nf4"):
        quantize_model(model, method)  # the compute dtype is the model's: bf16 for nf4-bf16
    if checkpointing:  # transformers recomputes each decoder layer in backward (in training mode only)
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_bytes, embed_bytes = linear_bytes(model), embedding_head_bytes(model)
    lm = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = list(lm.adapter_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_module = CausalLMLoss(model)
    tokens = a.bf16_tokens if dtype == torch.bfloat16 else 256  # the parent sets 256 where bf16 is native
    ids = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(1))
    rss_after_build = reset_peak()
    times = []
    for _ in range(a.big_steps):
        start = time.perf_counter()
        loss = loss_module({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
        (loss / (tokens - 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"tokens": tokens, "base_linear_bytes": base_bytes, "embedding_head_bytes": embed_bytes,
            "rss_after_build_mb": rss_after_build,
            "peak_rss_training_mb": vm_hwm_mb(), "step_seconds": times}


# ---- the run ----------------------------------------------------------------------------------------------------
def spawn(kind: str, **options) -> dict:
    args = [sys.executable, __file__, "--worker", kind]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} {options} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_dev(path: Path, rows: int = 200) -> Path:
    with open(E2E / "devset.csv", encoding="utf-8", newline="") as src, open(path, "w", encoding="utf-8",
                                                                             newline="") as dst:
        reader = csv.reader(src)
        writer = csv.writer(dst)
        for i, row in enumerate(reader):
            if i > rows:
                break
            writer.writerow(row)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-mrs", type=int, default=100)
    p.add_argument("--big-steps", type=int, default=2)
    p.add_argument("--bf16-tokens", type=int, default=8)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--big-only", action="store_true", help="part 2 alone")
    p.add_argument("--worker", choices=("train", "bleu", "big"))
    p.add_argument("--quantize", default="none")
    p.add_argument("--init", default="default")
    p.add_argument("--loftq-iter", type=int, default=1)
    p.add_argument("--only", help="comma-separated row names to train besides 'lora fp32' (the reference); no BLEU, "
                                  "no 1B part")
    p.add_argument("--out")
    p.add_argument("--dev")
    a = p.parse_args()
    if a.worker:
        torch.set_num_threads(os.cpu_count() or 1)
        result = {"train": worker_train, "bleu": worker_bleu, "big": worker_big}[a.worker](a)
        print(json.dumps(result))
        return

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    dev = write_dev(root / "dev200.csv")
    common = dict(steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, dev=dev)
    results = {}
    only = None if a.only is None else {"lora fp32", *(n.strip() for n in a.only.split(","))}
    for name, quantize, init, iters in ROWS:
        if a.big_only or only is not None and name not in only:
            continue
        results[name] = spawn("train", quantize=quantize, init=init, loftq_iter=iters,
                              out=root / name.replace(" ", "_").replace("=", ""), **common)
        print(name, json.dumps(results[name]), flush=True)
    quantize_of = {name: q for name, q, _, _ in ROWS}
    packed = {n: r for n, r in results.items() if quantize_of[n] != "none"}
    bleu, big = {}, {}
    if only is None and not a.big_only:
        best = min(packed, key=lambda n: packed[n]["val_loss"])
        bleu = {n: spawn("bleu", quantize=quantize_of[n], out=root / n.replace(" ", "_").replace("=", ""),
                         eval_mrs=a.eval_mrs) for n in ("lora fp32", best)}
    if not a.skip_big and only is None:
        native = resolve_dtype("auto") == torch.bfloat16  # bf16 matmuls in hardware: bf16 rows at 256 tokens
        rows = ("none", "nf4", "nf4-dq", "bf16")
        if native:  # and QLoRA's own setting: bf16 compute, with and without gradient checkpointing
            rows += ("nf4-bf16", "nf4-dq-bf16", "nf4-all-bf16", "nf4-dq-all-bf16", "bf16-ckpt", "nf4-bf16-ckpt",
                     "nf4-dq-bf16-ckpt", "nf4-all-bf16-ckpt", "nf4-dq-all-bf16-ckpt")
        for q in rows:
            big[q] = spawn("big", quantize=q, big_steps=a.big_steps,
                           bf16_tokens=256 if native else a.bf16_tokens)
            print("1B", q, json.dumps(big[q]), flush=True)

    print(f"\n# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; {a.steps} steps x batch {a.batch_size} x {a.max_length} (packed), E2E; "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    if results:
        print("\n| base | linear-weight bytes | vs fp32 | peak RSS training (MB) | saved vs fp32 / bytes saved | "
              "s/step | vs fp32 | step-0 loss | gap | eval loss | gap |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = results.get("lora fp32")
    for name, r in results.items():
        saved_bytes = (dense["base_linear_bytes"] - r["base_linear_bytes"]) / 2**20
        saved_rss = dense["peak_rss_training_mb"] - r["peak_rss_training_mb"]
        share = f"{saved_rss / saved_bytes:.2f}" if saved_bytes > 0 else "-"
        print(f"| {name} | {r['base_linear_bytes'] / 1e6:.1f} MB | {r['base_linear_bytes'] / dense['base_linear_bytes']:.3f}x"
              f" | {r['peak_rss_training_mb']:.0f} | {share} | {r['step_seconds']:.2f} | "
              f"{r['step_seconds'] / dense['step_seconds']:.2f}x | {r['first_loss']:.4f} | "
              f"{100 * (r['first_loss'] / dense['first_loss'] - 1):+.2f}% | {r['val_loss']:.4f} | "
              f"{100 * (r['val_loss'] / dense['val_loss'] - 1):+.2f}% |")
    if bleu:
        print(f"\nE2E BLEU, first {a.eval_mrs} dev MRs, greedy: " + ", ".join(
            f"{n} {b['BLEU']:.2f} ({b['decode_seconds']:.0f} s)" for n, b in bleu.items()))
    if big:
        print("\n| 1B-class (TinyLlama shape), all-linear r=16 | tokens | linear bytes | embedding + head | "
              "RSS after build (MB) | peak RSS (MB) | vs bf16 LoRA (the same checkpointing) | s/step |\n"
              "|---|---|---|---|---|---|---|---|")
        for q, r in big.items():
            ref = big["bf16-ckpt" if q.endswith("-ckpt") else "bf16"]["peak_rss_training_mb"]
            lb = f"{r['base_linear_bytes'] / 1e9:.2f} GB" if r["base_linear_bytes"] else "-"
            print(f"| {q} | {r['tokens']} | {lb} | {r['embedding_head_bytes'] / 1e6:.0f} MB | "
                  f"{r['rss_after_build_mb']:.0f} | {r['peak_rss_training_mb']:.0f} | "
                  f"{r['peak_rss_training_mb'] / ref:.2f}x | {statistics.median(r['step_seconds']):.1f} |")


if __name__ == "__main__":
    main()
