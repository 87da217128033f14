"""One training run's state, and what every step and the end of a run do with it (torchtune's run-state idea).

`Run` holds what the loop carries from step to step: the config, the output folder, the LoRA handle, the module the
loss is computed through (compiled and/or wrapped by DDP/FSDP2), optimizer and schedule, the trainer state, the
metrics log and the process group (`Dist`). Helpers take the run instead of a dozen arguments. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from loraforge.config import TRAIN_CONFIG_FILE as CONFIG_FILE, TrainConfig, build_config, load_yaml
from loraforge.data import read_records
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.lora.adapter import ADAPTER_WEIGHTS, atomic_write
from loraforge.models import BASE_FILE, base_record
from loraforge.quant.loftq import apply_loftq, save_moved_base
from loraforge.quant.model import body_linears, quantize_model
from loraforge.train import checkpoint as ckpt
from loraforge.train.distributed import Dist
from loraforge.train.observe import (METRICS_FILE, PLOT_FILE, MetricsLog, measure_matmul_peak, peak_memory_mb,
                                     peak_rss_mb, plot_loss_curve, rss_mb, train_flops)
from loraforge.train.runtime import release_free_memory
from loraforge.train.schedule import make_optimizer

log = logging.getLogger("loraforge")
SUMMARY_FILE = "train_summary.json"


class TrainingInterrupted(LoraforgeError):
    """SIGINT/SIGTERM stopped the run after a checkpoint was written; `--resume` continues it."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a run produced: the trained handle (model still in memory) and the summary written to disk."""

    lora: LoraModel
    tokenizer: object
    summary: dict = field(default_factory=dict)


@dataclass
class Run:
    cfg: TrainConfig
    output: Path
    lm: LoraModel
    forward: nn.Module  # the loss module the steps call: compiled, DDP- or FSDP2-wrapped as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: ckpt.TrainerState
    metrics: MetricsLog | None  # None off rank 0
    dist: Dist

    @property
    def model(self) -> nn.Module:
        return self.lm.model

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.lm.adapter_parameters().values())


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each micro-batch: seeded shuffles, epoch after epoch, so a seed fixes the data order."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_examples, generator=gen).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def resume_config(output: str | Path, overrides: dict) -> TrainConfig:
    """The config a run started with (its `train_config.yaml`), with flag overrides such as a larger max_steps."""
    path = Path(output) / CONFIG_FILE
    if not path.is_file():
        raise LoraforgeError(f"--resume {output}: no {CONFIG_FILE} there; give the output folder of a started run")
    return build_config(TrainConfig, {**load_yaml(path), **overrides, "output": str(output)}, source=str(path))


def inject(model: nn.Module, cfg: TrainConfig, task_type: str) -> LoraModel:
    """LoRA layers as `cfg` says (rank, alpha, dropout, targets, init) into `model`, saved with PEFT's `task_type`.
    LoftQ (`lora_init: loftq`) starts from a dense base: it fits A and B to each targeted layer's NF4 error and packs
    that layer, then the rest of the body is packed as any `--quantize` load does."""
    lm = LoraModel(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=cfg.target_modules, task_type=task_type,
                                     base_model_name_or_path=base_record(cfg.model)["path"],
                                     init_lora_weights=cfg.lora_init if cfg.lora_init in ("gaussian", "pissa")
                                     else True))
    if cfg.lora_init == "loftq":
        apply_loftq(lm, cfg.quantize, cfg.loftq_iter)
        if body_linears(model):
            quantize_model(model, cfg.quantize)
    return lm


def check_paths(cfg: TrainConfig, resume: bool) -> Path:
    """The output folder, created; raises `LoraforgeError` before any model loads if data or output will not do."""
    if not (cfg.data or cfg.mix) or not cfg.output:
        raise LoraforgeError("training needs --data FILE.jsonl (or a mix: of datasets in the YAML) and --output DIR "
                             "(or data:/output: in the YAML)")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise LoraforgeError(f"--output {output} is a file; give a folder for the adapter")
    if not resume and not cfg.overwrite and (output / ADAPTER_WEIGHTS).is_file():
        raise LoraforgeError(f"--output {output} already holds a trained adapter; give a new folder, --overwrite to "
                             f"replace it, or --resume {output} to continue its run")
    if not resume and ckpt.list_checkpoints(output):
        raise LoraforgeError(f"--output {output} holds checkpoints of an earlier run; continue it with --resume "
                             f"{output}, or choose a new folder")
    files = [(cfg.data, cfg.file_format), (cfg.val_data, cfg.file_format)]
    files += [(path, spec.file_format) for spec in cfg.mix or () for path in (spec.data, spec.val_data)]
    for path, file_format in files:
        if path:  # a missing or unreadable file fails before the model loads
            next(iter(read_records(path, file_format)), None)
    output.mkdir(parents=True, exist_ok=True)
    return output


def start(cfg: TrainConfig, output: Path, lm: LoraModel, forward: nn.Module, dist: Dist, resume: bool) -> Run:
    """AdamW + schedule and the trainer state: fresh (rank 0 writes train_config.yaml) or from the newest
    checkpoint (every rank reads it)."""
    optimizer, scheduler = make_optimizer(lm, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          loraplus_lr_ratio=cfg.loraplus_lr_ratio, schedule=cfg.schedule,
                                          warmup=cfg.warmup_steps, total=cfg.max_steps)
    state = ckpt.TrainerState()
    if resume:
        last = ckpt.list_checkpoints(output)
        if not last:
            raise LoraforgeError(f"--resume {output}: no complete checkpoint in {output / ckpt.CHECKPOINTS}")
        state = ckpt.load_checkpoint(last[-1], lm, optimizer, scheduler, rank=dist.rank)
        log.info("resuming from %s (step %d of %d)", last[-1], state.step, cfg.max_steps)
    elif dist.main:
        write_text(output / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text(output / BASE_FILE, json.dumps(base_record(cfg.model), indent=2) + "\n")
    metrics = MetricsLog(output / METRICS_FILE, resume_step=state.step if resume else None) if dist.main else None
    return Run(cfg, output, lm, forward, optimizer, scheduler, state, metrics, dist)


def finish_step(run: Run, loss: float, bar, *, tokens: int, learned: int, start_time: float) -> None:
    """What ends every optimizer step: stop on a non-finite loss, clip, step the optimizer and schedule, hand freed
    memory back (`release_memory`), count into the state, write metrics.jsonl, update the progress bar. `loss` is
    the step's mean over its `learned` tokens (or labels), over every rank; `tokens` the step's real tokens over
    every rank."""
    cfg, state = run.cfg, run.state
    step = state.step + 1
    if not math.isfinite(loss):
        raise LoraforgeError(f"step {step}: the loss is {loss}; lower --lr (now {cfg.lr}) and retry")
    lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # The step's activations went back to glibc's heap; handing its free pages to the OS means the next step faults
    # them in again (release_memory false keeps them).
    if run.dist.device.type == "cpu" and cfg.release_memory:
        release_free_memory()

    state.step, state.losses = step, [*state.losses, loss]
    state.tokens += tokens
    state.learned_tokens += learned
    state.train_seconds += time.perf_counter() - start_time
    tps = state.tokens / state.train_seconds
    if run.metrics:
        run.metrics.write(step=step, loss=loss, lr=lr, tokens=state.tokens, tokens_per_second=round(tps, 2),
                          seconds=round(state.train_seconds, 3), rss_mb=round(rss_mb()),
                          peak_rss_mb=round(peak_rss_mb()))
    if step % cfg.log_every == 0:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")


def track_best(run: Run, val_loss: float) -> tuple[bool, bool]:
    """Record an evaluation: keep the adapter in checkpoints/best when it improved. Returns (improved, stop early);
    every rank computes the same, from the same validation loss."""
    state = run.state
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
        adapter = run.lm.adapter_state_dict()  # every rank (FSDP2 gathers), rank 0 writes
        if run.dist.main:
            ckpt.save_best(run.output, run.lm, adapter)
        return True, False
    state.evals_without_improvement += 1
    return False, 0 < run.cfg.early_stopping <= state.evals_without_improvement


def checkpoint_or_stop(run: Run, signum: int | None) -> None:
    """After a step: write checkpoints/step-N when due or when a signal came (every rank agreed on `signum`); on a
    signal, stop with a message."""
    cfg, state = run.cfg, run.state
    if (cfg.save_every and state.step % cfg.save_every == 0) or signum:
        ckpt.save_checkpoint(run.output, run.lm, run.optimizer, run.scheduler, state, cfg.keep_checkpoints,
                             run.dist)
    if signum:
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint written to "
            f"{run.output / ckpt.CHECKPOINTS}/step-{state.step}. Continue with: loraforge train --resume {run.output}")


def finish_run(run: Run, stats, **extra) -> dict:
    """Rank 0: the final adapter (the best one when there was validation), loss curve, and train_summary.json (with
    `extra`'s keys after the common ones). Other ranks return the same summary without writing."""
    cfg, output, state, model = run.cfg, run.output, run.state, run.model
    best = output / ckpt.CHECKPOINTS / "best"
    adapter = run.lm.adapter_state_dict()  # every rank (FSDP2 gathers the LoRA weights only), rank 0 writes
    if run.dist.main and not (state.best_step is not None and best.is_dir()):
        save_adapter(run.lm, output, adapter)
    if run.dist.main and cfg.lora_init == "loftq" and cfg.loftq_iter > 1:  # the base moved: keep it with the adapter
        save_moved_base(run.lm, output, cfg.quantize, cfg.loftq_iter)
    if run.dist.main:
        if state.best_step is not None and best.is_dir():
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                data = (best / name).read_bytes()
                atomic_write(output / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        plot_loss_curve(run.metrics.rows(), output / PLOT_FILE, f"{cfg.model}: LoRA r={cfg.r}")
    seconds = max(state.train_seconds, 1e-9)
    dtype = next(model.parameters()).dtype
    report = run.lm.report()
    flops = train_flops(model, report.trainable, state.tokens, state.learned_tokens)
    peak = measure_matmul_peak(dtype, device=run.dist.device) * run.dist.world
    summary = {
        "model": cfg.model,
        "steps": state.step,
        "train_tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": round(state.tokens / seconds, 2),
        "final_loss": state.losses[-1],
        "losses": state.losses,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_memory_mb": round(peak_memory_mb(run.dist.device), 1),  # the GPU's allocations on CUDA
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": round(100 * report.trainable / report.total, 4),
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": run.dist.world,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / seconds / peak,
        "data": {"records_read": stats.records_read, "used": stats.used, "skipped": stats.skipped,
                 "truncated": stats.truncated},
        **extra,
    }
    if run.dist.main:
        write_text(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    run.dist.barrier()
    return summary


class StopFlag:
    signal: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops. A second signal kills."""
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag.signal is not None:
            raise KeyboardInterrupt
        flag.signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def write_text(path: Path, text: str) -> None:
    """Write `path` atomically (a crash leaves the old file or the new one, never half of one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
