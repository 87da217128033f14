"""The training loop: one function you can read top to bottom.

load base -> inject LoRA -> read and tokenize data -> AdamW on the adapter only, step by step, with evaluation,
checkpoints and a clean stop on SIGINT/SIGTERM -> adapter, metrics, loss curve and summary on disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from loraforge.config import TrainConfig, build_config, load_yaml, resolve_dtype
from loraforge.data import collate, count_tokens, load_examples, pad_id_for, read_records
from loraforge.data.chat import write_system_prompt
from loraforge.data.packing import collate_packed, pack, packing_supported
from loraforge.data.split import train_val_split
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.lora.adapter import atomic_write, is_adapter_name
from loraforge.models import load_model
from loraforge.train import checkpoint as ckpt
from loraforge.train.kernels import packed_attention_on, packed_attention_supported, patched_for_training
from loraforge.train.loss import learned_token_count, token_loss_sum
from loraforge.train.observe import (METRICS_FILE, PLOT_FILE, MetricsLog, measure_matmul_peak, peak_rss_mb,
                                     plot_loss_curve, rss_mb, summary_screen, train_flops)
from loraforge.train.runtime import release_free_memory
from loraforge.train.schedule import make_optimizer

log = logging.getLogger("loraforge")
SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.yaml"


class TrainingInterrupted(LoraforgeError):
    """SIGINT/SIGTERM stopped the run after a checkpoint was written; `--resume` continues it."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a run produced: the trained handle (model still in memory) and the summary written to disk."""

    lora: LoraModel
    tokenizer: object
    summary: dict = field(default_factory=dict)


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


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; write adapter, metrics and summary to `cfg.output`.

    With `resume`, continue from the newest complete checkpoint in `cfg.output`: same data order, RNG, optimizer
    and scheduler state, so the loss curve is the one an uninterrupted run would have drawn.
    Encoder tasks (`cfg.task` seq-cls / token-cls) train a head instead: see `train.heads.train_head`.
    """
    if cfg.task != "causal-lm":
        from loraforge.train.heads import train_head  # heads builds on this module's helpers

        return train_head(cfg, resume=resume, progress=progress)
    if cfg.per_user:
        return train_per_user(cfg, resume=resume, progress=progress)
    output = check_paths(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype))
    train_set, val_set, stats = _load_data(cfg, tokenizer)
    return fit(cfg, model, tokenizer, train_set, val_set, stats, output, resume=resume, progress=progress)


def train_per_user(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, TrainResult]:
    """One adapter per value of `cfg.per_user` into `cfg.output/<value>/`: the base is loaded once and the file read
    and tokenized once; each user's LoRA layers are injected, trained, saved and taken out again. With `resume`,
    users whose run finished are skipped and an interrupted one continues from its checkpoint."""
    from loraforge.data import load_examples_by

    if not cfg.data or not cfg.output:
        raise LoraforgeError("training needs --data FILE.jsonl and --output DIR (or data:/output: in the YAML)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype))
    groups = load_examples_by(cfg.data, cfg.per_user, tokenizer, cfg.max_length, on_bad_record=cfg.on_bad_record,
                              recipe=cfg.recipe, columns=cfg.columns, fmt=cfg.data_format,
                              file_format=cfg.file_format, max_examples=cfg.max_examples or None, seed=cfg.seed)
    for user in groups:
        if not is_adapter_name(user):
            raise LoraforgeError(f"{cfg.data}: {cfg.per_user} value {user!r} cannot name an adapter folder: use 1-64 "
                                 "letters, digits, '.', '_' or '-', starting with a letter or digit")
    results: dict[str, TrainResult] = {}
    for user, (examples, stats) in groups.items():
        user_cfg = dataclasses.replace(cfg, per_user=None, output=str(Path(cfg.output) / user))
        if resume and (Path(user_cfg.output) / SUMMARY_FILE).is_file():
            log.info("%s: finished earlier, skipped", user)
            continue
        output = check_paths(user_cfg, resume and bool(ckpt.list_checkpoints(Path(user_cfg.output))))
        log.info("%s: %s", user, stats.summary())
        train_set, val_set = train_val_split(examples, cfg.val_split, cfg.seed) if cfg.val_split else (examples, [])
        results[user] = fit(user_cfg, model, tokenizer, train_set, val_set, stats, output,
                            resume=resume and bool(ckpt.list_checkpoints(output)), progress=progress)
        model = results[user].lora.unload()  # the plain base again, for the next user
    return results


def fit(cfg: TrainConfig, model, tokenizer, train_set: list, val_set: list, stats, output: Path, *,
        resume: bool = False, progress: bool = True) -> TrainResult:
    """Inject LoRA into `model` and train it on tokenized `train_set`: the causal-LM loop."""
    torch.manual_seed(cfg.seed)  # LoRA init depends on the seed only, not on what loading consumed
    lm = LoraModel(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=cfg.target_modules, task_type="CAUSAL_LM",
                                     base_model_name_or_path=cfg.model))
    report = lm.report()
    log.info("%s", report)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forward_model = torch.compile(model) if cfg.compile else model
    optimizer, scheduler, state, metrics = start_or_resume(cfg, output, lm, resume)
    params = list(lm.adapter_parameters().values())
    pad_id = pad_id_for(tokenizer)
    packed = cfg.packing and packing_supported(model)
    if cfg.packing and not packed:
        log.warning("%s ignores packed position ids; training on padded batches", model.config.model_type)
    rows = pack(train_set, cfg.max_length, seed=cfg.seed) if packed else train_set
    if packed:
        log.info("packing: %d examples in %d rows of up to %d tokens", len(train_set), len(rows), cfg.max_length)
    per_example_attention = packed and packed_attention_supported(model)
    micro = batch_order(len(rows), cfg.batch_size, cfg.max_steps * cfg.grad_accum, cfg.seed)

    model.train()
    bar = tqdm(range(state.step + 1, cfg.max_steps + 1), desc="train", disable=not progress, dynamic_ncols=True,
               initial=state.step, total=cfg.max_steps)
    with stop_on_signals() as stop, patched_for_training(model) as n_patched:
        log.debug("lean training forwards on %d modules", n_patched)
        for step in bar:
            start = time.perf_counter()
            batches = [(collate_packed if packed else collate)([rows[i] for i in idx], pad_id)
                       for idx in micro[(step - 1) * cfg.grad_accum: step * cfg.grad_accum]]
            step_learned = sum(learned_token_count(b) for b in batches)  # every token weighs the same
            loss_sum = 0.0
            for batch in batches:
                with packed_attention_on(model) if per_example_attention else contextlib.nullcontext():
                    total, _ = token_loss_sum(forward_model, batch, cfg.label_smoothing)
                (total / max(step_learned, 1)).backward()
                loss_sum += total.item()
            finish_step(cfg, step, loss_sum / max(step_learned, 1), params, optimizer, scheduler, state, metrics, bar,
                        tokens=sum(_real_tokens(b) for b in batches), learned=step_learned, start=start)

            stop_early = False
            if val_set and (step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                val_loss = evaluate(model, val_set, cfg.batch_size, pad_id)
                metrics.write(step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                bar.write(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                _, stop_early = track_best(cfg, output, lm, state, val_loss)
            checkpoint_or_stop(cfg, output, lm, optimizer, scheduler, state, stop.signal)
            if stop_early:
                log.info("early stopping: %d evaluations without improvement", cfg.early_stopping)
                break
    model.eval()
    summary = finish_run(cfg, output, lm, model, state, stats)
    if stats.one_system is not None:  # generate uses it by default, so the adapter answers as it was trained
        write_system_prompt(output, stats.one_system)
    if progress:
        tqdm.write(summary_screen(summary), file=sys.stderr)
    return TrainResult(lora=lm, tokenizer=tokenizer, summary=summary)


def finish_step(cfg: TrainConfig, step: int, loss: float, params: list, optimizer, scheduler,
                state: ckpt.TrainerState, metrics: MetricsLog, bar, *, tokens: int, learned: int,
                start: float) -> None:
    """What ends every optimizer step, in both loops (this one and heads.py's): stop on a non-finite loss, clip,
    step the optimizer and schedule, hand freed memory back, count into `state`, write metrics.jsonl, update the
    progress bar. `loss` is the step's mean over its `learned` tokens (or labels); `start` its perf_counter start."""
    if not math.isfinite(loss):
        raise LoraforgeError(f"step {step}: the loss is {loss}; lower --lr (now {cfg.lr}) and retry")
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    release_free_memory()

    state.step, state.losses = step, [*state.losses, loss]
    state.tokens += tokens
    state.learned_tokens += learned
    state.train_seconds += time.perf_counter() - start
    tps = state.tokens / state.train_seconds
    lr = scheduler.get_last_lr()[0]
    metrics.write(step=step, loss=loss, lr=lr, tokens=state.tokens, tokens_per_second=round(tps, 2),
                  seconds=round(state.train_seconds, 3), rss_mb=round(rss_mb()), peak_rss_mb=round(peak_rss_mb()))
    if step % cfg.log_every == 0:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")


def start_or_resume(cfg: TrainConfig, output: Path, lm: LoraModel, resume: bool):
    """AdamW + schedule, and the trainer state: fresh (writing train_config.yaml) or from the newest checkpoint.
    Returns (optimizer, scheduler, state, metrics log)."""
    optimizer, scheduler = make_optimizer(lm, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          loraplus_lr_ratio=cfg.loraplus_lr_ratio, schedule=cfg.schedule,
                                          warmup=cfg.warmup_steps, total=cfg.max_steps)
    state = ckpt.TrainerState()
    if resume:
        last = ckpt.list_checkpoints(output)
        if not last:
            raise LoraforgeError(f"--resume {output}: no complete checkpoint in {output / ckpt.CHECKPOINTS}")
        state = ckpt.load_checkpoint(last[-1], lm, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", last[-1], state.step, cfg.max_steps)
    else:
        write_text(output / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = MetricsLog(output / METRICS_FILE, resume_step=state.step if resume else None)
    return optimizer, scheduler, state, metrics


def track_best(cfg: TrainConfig, output: Path, lm: LoraModel, state: ckpt.TrainerState, val_loss: float
               ) -> tuple[bool, bool]:
    """Record an evaluation: keep the adapter in checkpoints/best when it improved. Returns (improved, stop early)."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.step, 0
        ckpt.save_best(output, lm)
        return True, False
    state.evals_without_improvement += 1
    return False, 0 < cfg.early_stopping <= state.evals_without_improvement


def checkpoint_or_stop(cfg: TrainConfig, output: Path, lm: LoraModel, optimizer, scheduler,
                       state: ckpt.TrainerState, signum: int | None) -> None:
    """After a step: write checkpoints/step-N when due or when a signal came; on a signal, stop with a message."""
    if (cfg.save_every and state.step % cfg.save_every == 0) or signum:
        ckpt.save_checkpoint(output, lm, optimizer, scheduler, state, cfg.keep_checkpoints)
    if signum:
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint written to "
            f"{output / ckpt.CHECKPOINTS}/step-{state.step}. Continue with: loraforge train --resume {output}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per learned token over `examples` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss_sum, n = token_loss_sum(model, collate(examples[start:start + batch_size], pad_id))
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def finish_run(cfg: TrainConfig, output: Path, lm: LoraModel, model, state: ckpt.TrainerState, stats,
               **extra) -> dict:
    """Final adapter (the best one when there was validation), loss curve, and train_summary.json (with `extra`'s
    keys after the common ones)."""
    best = output / ckpt.CHECKPOINTS / "best"
    if state.best_step is not None and best.is_dir():
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            data = (best / name).read_bytes()
            atomic_write(output / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    else:
        save_adapter(lm, output)
    rows = MetricsLog(output / METRICS_FILE, resume_step=state.step).rows()
    plot_loss_curve(rows, output / PLOT_FILE, f"{cfg.model}: LoRA r={cfg.r}")
    seconds = max(state.train_seconds, 1e-9)
    dtype = next(model.parameters()).dtype
    report = lm.report()
    flops = train_flops(model, report.trainable, state.tokens, state.learned_tokens)
    peak = measure_matmul_peak(dtype)
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
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": round(100 * report.trainable / report.total, 4),
        "dtype": str(dtype).removeprefix("torch."),
        "achieved_tflops": flops / seconds / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / seconds / peak,
        "data": {"records_read": stats.records_read, "used": stats.used, "skipped": stats.skipped,
                 "truncated": stats.truncated},
        **extra,
    }
    write_text(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def check_paths(cfg: TrainConfig, resume: bool) -> Path:
    """The output folder, created; raises `LoraforgeError` before any model loads if data or output will not do."""
    if not cfg.data or not cfg.output:
        raise LoraforgeError("training needs --data FILE.jsonl and --output DIR (or data:/output: in the YAML)")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise LoraforgeError(f"--output {output} is a file; give a folder for the adapter")
    if not resume and ckpt.list_checkpoints(output):
        raise LoraforgeError(f"--output {output} holds checkpoints of an earlier run; continue it with --resume "
                             f"{output}, or choose a new folder")
    for name in ("data", "val_data"):
        path = getattr(cfg, name)
        if path:
            # a missing or unreadable file fails before the model loads
            next(iter(read_records(path, cfg.file_format)), None)
    output.mkdir(parents=True, exist_ok=True)
    return output


def _load_data(cfg: TrainConfig, tokenizer) -> tuple[list, list, object]:
    options = dict(on_bad_record=cfg.on_bad_record, recipe=cfg.recipe, columns=cfg.columns, fmt=cfg.data_format,
                   file_format=cfg.file_format)
    examples, stats = load_examples(cfg.data, tokenizer, cfg.max_length, max_examples=cfg.max_examples or None,
                                    seed=cfg.seed, **options)
    log.info("data: %s", stats.summary())
    for reason in stats.skip_reasons:
        log.warning("skipped: %s", reason)
    if cfg.val_data:
        val, val_stats = load_examples(cfg.val_data, tokenizer, cfg.max_length, **options)
        log.info("validation: %s", val_stats.summary())
        return examples, val, stats
    if cfg.val_split:
        train_set, val_set = train_val_split(examples, cfg.val_split, cfg.seed)
        return train_set, val_set, stats
    return examples, [], stats


class _StopFlag:
    signal: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[_StopFlag]:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops. A second signal kills."""
    flag = _StopFlag()
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


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["num_tokens"]) if "num_tokens" in batch else count_tokens(batch)


def write_text(path: Path, text: str) -> None:
    """Write `path` atomically (a crash leaves the old file or the new one, never half of one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
