"""The training loop: one function you can read top to bottom, for every task and any number of processes.

train(cfg): load the base and the data into a *task* (a causal LM here, an encoder head in `heads.py`) -> inject
LoRA -> `fit`: AdamW on the adapter only, step by step, with validation, checkpoints and a clean stop on
SIGINT/SIGTERM -> adapter, metrics, loss curve and summary on disk.

A task supplies the batches, the loss module (the model and its loss as one `nn.Module`, which torch.compile, DDP and
FSDP2 wrap whole), how many learned units (tokens or labels) a batch holds, and validation. Under torchrun every rank
builds the same seeded batch plan and takes its share of each global batch; the loss of a step is its token sum over
the step's learned units counted on every rank, so one process and N processes take the same gradient step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loraforge.config import TrainConfig, load_quantize, resolve_dtype
from loraforge.data import collate, count_tokens, load_examples, pad_id_for
from loraforge.data.chat import write_system_prompt
from loraforge.data.mix import MixStats, load_mix
from loraforge.data.packing import collate_packed, pack, packing_supported
from loraforge.data.split import train_val_split
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraModel
from loraforge.lora.adapter import is_adapter_name
from loraforge.models import load_model
from loraforge.train import checkpoint as ckpt
from loraforge.train.distributed import Dist, check_global_batch, no_sync, setup, wrap
from loraforge.train.kernels import packed_attention_on, packed_attention_supported, patched_for_training
from loraforge.train.loss import CausalLMLoss, learned_token_count
from loraforge.train.observe import summary_screen
from loraforge.train.runtime import CpuShare
from loraforge.train.run import (CONFIG_FILE, SUMMARY_FILE, TrainingInterrupted, TrainResult, batch_order,
                                 check_paths, checkpoint_or_stop, finish_run, finish_step, inject, resume_config,
                                 start, stop_on_signals, track_best)

log = logging.getLogger("loraforge")
__all__ = ["CONFIG_FILE", "SUMMARY_FILE", "TrainResult", "TrainingInterrupted", "batch_order", "evaluate", "fit",
           "resume_config", "train", "train_per_user"]


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; write adapter, metrics and summary to `cfg.output`.

    With `resume`, continue from the newest complete checkpoint in `cfg.output`: same data order, RNG, optimizer
    and scheduler state, so the loss curve is the one an uninterrupted run would have drawn. Encoder tasks
    (`cfg.task` seq-cls / token-cls) train a head (`heads.HeadTask`).
    """
    if cfg.per_user:
        return train_per_user(cfg, resume=resume, progress=progress)
    output = check_paths(cfg, resume)
    dist = setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.task == "causal-lm":
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype, dist.device), quantize=load_quantize(cfg))
        cfg = check_context(cfg, model)
        train_set, val_set, stats = _load_data(cfg, tokenizer)
        task = CausalTask(cfg, model.to(dist.device), tokenizer, train_set, val_set,
                          mix=stats.report() if isinstance(stats, MixStats) else None)
    else:
        from loraforge.train.heads import HeadTask

        task, stats = HeadTask.prepare(cfg, output, resume, dist)
    return fit(cfg, task, stats, output, dist, resume=resume, progress=progress)


def train_per_user(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, TrainResult]:
    """One adapter per value of `cfg.per_user` into `cfg.output/<value>/`: the base is loaded once and the file read
    and tokenized once; each user's LoRA layers are injected, trained, saved and taken out again. With `resume`,
    users whose run finished are skipped and an interrupted one continues from its checkpoint."""
    from loraforge.data import load_examples_by

    if not cfg.data or not cfg.output:
        raise LoraforgeError("training needs --data FILE.jsonl and --output DIR (or data:/output: in the YAML)")
    dist = setup(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype, dist.device), quantize=load_quantize(cfg))
    cfg = check_context(cfg, model)
    model = model.to(dist.device)
    groups = load_examples_by(cfg.data, cfg.per_user, tokenizer, cfg.max_length, on_bad_record=cfg.on_bad_record,
                              **cfg.data_recipe(), fmt=cfg.data_format,
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
        user_resume = resume and bool(ckpt.list_checkpoints(Path(user_cfg.output)))
        output = check_paths(user_cfg, user_resume)
        log.info("%s: %s", user, stats.summary())
        train_set, val_set = train_val_split(examples, cfg.val_split, cfg.seed) if cfg.val_split else (examples, [])
        task = CausalTask(user_cfg, model, tokenizer, train_set, val_set)
        results[user] = fit(user_cfg, task, stats, output, dist, resume=user_resume, progress=progress)
        model = results[user].lora.unload()  # the plain base again, for the next user
    return results


def fit(cfg: TrainConfig, task, stats, output: Path, dist: Dist = Dist(), *, resume: bool = False,
        progress: bool = True) -> TrainResult:
    """Inject LoRA into the task's model and train it: the loop."""
    torch.manual_seed(cfg.seed)  # LoRA init depends on the seed only, not on what loading consumed
    lm = task.inject(cfg, output, resume, dist)
    model = lm.model
    log.info("%s", lm.report())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_global_batch(cfg.batch_size, dist.world)
    cfg = plan_steps(cfg, len(task.rows))
    cpu_share = CpuShare() if dist.device.type == "cpu" and not cfg.threads and dist.world == 1 \
        else contextlib.nullcontext()  # threads that follow the free CPUs: a CPU-only matter
    with stop_on_signals() as stop, task.training(), cpu_share as cpus:  # lean forwards patched in before wrapping
        forward = wrap(task.loss, dist, cfg.strategy, task.layers())
        if cfg.compile:
            forward = torch.compile(forward, backend=COMPILE_BACKEND)
        run = start(cfg, output, lm, forward, dist, resume)
        share = cfg.batch_size // dist.world
        micro = batch_order(len(task.rows), cfg.batch_size, cfg.max_steps * cfg.grad_accum, cfg.seed)

        model.train()
        bar = tqdm(range(run.state.step + 1, cfg.max_steps + 1), desc="train", dynamic_ncols=True,
                   disable=not (progress and dist.main), initial=run.state.step, total=cfg.max_steps)
        for step in bar:
            if cpus:
                cpus.update()  # threads follow the CPUs other processes leave free
            start_time = time.perf_counter()
            batches = [task.batch(idx[dist.rank * share:(dist.rank + 1) * share])  # this rank's share
                       for idx in micro[(step - 1) * cfg.grad_accum: step * cfg.grad_accum]]
            units = dist.sum([sum(task.units(b) for b in batches)])[0]  # every learned token of the step weighs
            loss_sum = 0.0                                                 # the same, on every rank
            for k, batch in enumerate(batches):
                with no_sync(forward, last=k == len(batches) - 1), task.context(batch):
                    total = forward(batch)
                    # DDP/FSDP average the ranks' gradients; x world turns that into the sum over the step's units
                    (total * dist.world / max(units, 1)).backward()
                loss_sum += total.item()
            loss_sum, tokens = dist.sum([loss_sum, sum(task.tokens(b) for b in batches)])
            finish_step(run, loss_sum / max(units, 1), bar, tokens=int(tokens), learned=int(units),
                        start_time=start_time)

            stop_early = False
            if task.val_set and (step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                val_loss, scores, line = task.validate(forward, cfg.batch_size)
                if run.metrics:
                    run.metrics.write(step=step, val_loss=val_loss, **scores)
                if dist.main:
                    bar.write(f"step {step}: {line}")
                improved, stop_early = track_best(run, val_loss)
                task.best_scores = scores if improved else task.best_scores
            checkpoint_or_stop(run, dist.agree(stop.signal))
            if stop_early:
                log.info("early stopping: %d evaluations without improvement", cfg.early_stopping)
                break
    model.eval()
    summary = finish_run(run, stats, **task.summary_extra())
    if dist.main:
        task.write_extra(output, stats)
    if progress and dist.main:
        tqdm.write(summary_screen(summary), file=sys.stderr)
    return TrainResult(lora=lm, tokenizer=task.tokenizer, summary=summary)


COMPILE_BACKEND = "inductor"
"""torch.compile's backend for `--compile` (tests swap in one that counts what it traced)."""


class CausalTask:
    """A decoder learning the learned spans of its examples: token batches (packed rows where the model supports
    position ids), the causal-LM loss, validation loss and perplexity."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_set: list, val_set: list, mix: dict | None = None):
        self.cfg, self.tokenizer, self.val_set, self.mix = cfg, tokenizer, val_set, mix
        self.pad_id = pad_id_for(tokenizer)
        self.packed = cfg.packing and packing_supported(model)
        if cfg.packing and not self.packed:
            log.warning("%s ignores packed position ids; training on padded batches", model.config.model_type)
        self.rows = pack(train_set, cfg.max_length, seed=cfg.seed) if self.packed else train_set
        if self.packed:
            log.info("packing: %d examples in %d rows of up to %d tokens", len(train_set), len(self.rows),
                     cfg.max_length)
        # attention per packed example: SDPA per example on a CPU, varlen flash attention on a GPU in half
        # precision; a GPU in fp32 runs transformers' attention over the block-diagonal mask it builds instead
        self.packed_attention = self.packed and (model.device.type == "cpu" or model.dtype in (
            torch.float16, torch.bfloat16)) and packed_attention_supported(model)  # the probe only where it is used
        self.model = model
        self.loss = CausalLMLoss(model, cfg.label_smoothing)
        self.best_scores: dict = {}

    def inject(self, cfg: TrainConfig, output: Path, resume: bool, dist: Dist) -> LoraModel:
        return inject(self.model, cfg, "CAUSAL_LM")

    def layers(self) -> list[torch.nn.Module]:
        """The decoder layers, each sharded on its own under FSDP2."""
        inner = getattr(self.model, self.model.base_model_prefix, None)
        return list(getattr(inner, "layers", None) or getattr(inner, "h", None) or [])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        batch = (collate_packed if self.packed else collate)(rows, self.pad_id)
        return {k: v.to(self.model.device) for k, v in batch.items()}  # moved once, at the top of the step

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return learned_token_count(batch)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_tokens"]) if "num_tokens" in batch else count_tokens(batch)

    def context(self, batch: dict[str, torch.Tensor]):
        if not self.packed_attention:
            return contextlib.nullcontext()
        return packed_attention_on(self.model, batch["position_ids"])

    def training(self):
        return patched_for_training(self.model)

    def validate(self, forward, batch_size: int) -> tuple[float, dict, str]:
        loss = evaluate(self.model, self.val_set, batch_size, self.pad_id, forward)
        ppl = math.exp(min(loss, 50))
        return loss, {"val_ppl": ppl}, f"val loss {loss:.4f}, perplexity {ppl:.2f}"

    def summary_extra(self) -> dict:
        return {"mix": self.mix} if self.mix else {}  # each dataset's share of a mix

    def write_extra(self, output: Path, stats) -> None:
        if stats.one_system is not None:  # generate uses it by default, so the adapter answers as it was trained
            write_system_prompt(output, stats.one_system)


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, batch_size: int, pad_id: int, forward=None) -> float:
    """Mean cross-entropy per learned token over `examples` (eval mode, no dropout, no label smoothing), through
    `forward` (the run's loss module, so FSDP2 gathers the shards) or a plain `CausalLMLoss`."""
    was_training = model.training
    model.eval()
    loss_module = forward if forward is not None else CausalLMLoss(model)
    inner = getattr(loss_module, "module", loss_module)  # DDP keeps it as .module
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile as ._orig_mod
    smoothing, inner.label_smoothing = inner.label_smoothing, 0.0
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            total, count = total + loss_module(batch).item(), count + learned_token_count(batch)
    finally:
        inner.label_smoothing = smoothing
        model.train(was_training)
    return total / max(count, 1)


def plan_steps(cfg: TrainConfig, rows: int) -> TrainConfig:
    """max_steps from --epochs (passes over the rows), and a warning when a step must repeat rows."""
    if cfg.epochs:
        steps = max(1, math.ceil(cfg.epochs * rows / (cfg.batch_size * cfg.grad_accum)))
        log.info("%g epochs of %d rows at %d a step: %d steps", cfg.epochs, rows, cfg.batch_size * cfg.grad_accum,
                 steps)
        cfg = dataclasses.replace(cfg, max_steps=steps)
    if rows < cfg.batch_size:
        log.warning("%d training rows, fewer than one batch of %d: every step repeats rows (lower --batch-size to "
                    "%d to see each once a step)", rows, cfg.batch_size, rows)
    return cfg


def check_context(cfg: TrainConfig, model) -> TrainConfig:
    """--max-length must fit the model's context (position embeddings, or RoPE's trained length): a value given
    beyond it is refused; the default is lowered to it."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not context or cfg.max_length <= context:
        return cfg
    if cfg.max_length == DEFAULT_MAX_LENGTH:
        log.info("max_length: %s's context is %d tokens, less than the default %d; using %d", cfg.model, context,
                 cfg.max_length, context)
        return dataclasses.replace(cfg, max_length=context)
    raise LoraforgeError(f"--max-length {cfg.max_length} is longer than {cfg.model}'s context of {context} tokens; "
                         f"use --max-length {context} or less")


DEFAULT_MAX_LENGTH = TrainConfig.__dataclass_fields__["max_length"].default


def _load_data(cfg: TrainConfig, tokenizer) -> tuple[list, list, object]:
    if cfg.mix:
        return _load_mix(cfg, tokenizer)
    options = dict(on_bad_record=cfg.on_bad_record, **cfg.data_recipe(), fmt=cfg.data_format,
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


def _load_mix(cfg: TrainConfig, tokenizer) -> tuple[list, list, MixStats]:
    """Several datasets, each with its own recipe, drawn into one epoch (`data.mix`)."""
    train_set, val_set, stats = load_mix(cfg.mix, tokenizer, cfg.max_length, temperature=cfg.mix_temperature,
                                         seed=cfg.seed, on_bad_record=cfg.on_bad_record, val_data=cfg.val_data,
                                         val_split=cfg.val_split)
    for part in stats.parts:
        log.info("data %s: %s", part.name, part.stats.summary())
    log.info("%s", stats.mix_line())
    for reason in stats.skip_reasons:
        log.warning("skipped: %s", reason)
    if val_set:
        log.info("validation: %d examples", len(val_set))
    return train_set, val_set, stats
