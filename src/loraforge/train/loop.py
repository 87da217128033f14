"""The training loop: one function you can read top to bottom.

load base -> inject LoRA -> read and tokenize data -> AdamW on the adapter only -> save adapter + summary.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from loraforge.config import TrainConfig
from loraforge.data import collate, count_tokens, load_examples, pad_id_for, read_records
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.lora.adapter import atomic_write
from loraforge.models import load_model
from loraforge.train.loss import causal_lm_loss

log = logging.getLogger("loraforge")
SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.yaml"


@dataclass
class TrainResult:
    """What a run produced: the trained handle (model still in memory) and the summary written to disk."""

    lora: LoraModel
    tokenizer: object
    summary: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def lr_lambda(warmup: int, total: int):
    """Linear warmup (step s of w runs at (s+1)/(w+1) of the peak), then cosine decay to zero at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: seeded shuffles, epoch after epoch, so a seed fixes the data order."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_examples, generator=gen).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; write the adapter and summary to `cfg.output`."""
    if not cfg.data or not cfg.output:
        raise LoraforgeError("training needs --data FILE.jsonl and --output DIR (or data:/output: in the YAML)")
    read_records(cfg.data)  # a missing file or unknown suffix fails now, not after the (maybe slow) model load
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise LoraforgeError(f"--output {output} is a file; give a folder for the adapter and summary")
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=dtype)
    examples, stats = load_examples(cfg.data, tokenizer, cfg.max_length, on_bad_record=cfg.on_bad_record)
    log.info("data: %s", stats.summary())
    for reason in stats.skip_reasons:
        log.warning("skipped: %s", reason)

    torch.manual_seed(cfg.seed)  # LoRA init depends on the seed only, not on what loading consumed
    lora_config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM",
                             base_model_name_or_path=cfg.model)
    lm = LoraModel(model, lora_config)
    report = lm.report()
    log.info("%s", report)
    params = list(lm.adapter_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    pad_id = pad_id_for(tokenizer)

    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(batch_order(len(examples), cfg.batch_size, cfg.max_steps, cfg.seed), desc="train",
               disable=not progress, dynamic_ncols=True)
    for step, indices in enumerate(bar, 1):
        batch = collate([examples[i] for i in indices], pad_id)
        loss = causal_lm_loss(model, batch)
        if not torch.isfinite(loss):
            raise LoraforgeError(f"step {step}: the loss is {loss.item()}; lower --lr (now {cfg.lr}) and retry")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += count_tokens(batch)
        if step % cfg.log_every == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / elapsed:.0f}")
    seconds = time.perf_counter() - start
    model.eval()

    save_adapter(lm, output)
    summary = {
        "model": cfg.model,
        "steps": cfg.max_steps,
        "train_tokens": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2),
        "final_loss": losses[-1],
        "losses": losses,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": round(100 * report.trainable / report.total, 4),
        "data": {"records_read": stats.records_read, "used": stats.used, "skipped": stats.skipped,
                 "truncated": stats.truncated},
    }
    _write_text(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    _write_text(output / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return TrainResult(lora=lm, tokenizer=tokenizer, summary=summary)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
