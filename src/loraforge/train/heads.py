"""Training an encoder's task head: one function, like `loop.train`, for `--task seq-cls` and `--task token-cls`.

load the encoder with a new head -> inject LoRA (the head trains in full: `modules_to_save`, added by task_type as
PEFT does) -> read, few-shot sample and encode the data -> AdamW step by step, with validation (loss and the task's
metric), checkpoints and a clean stop on SIGINT/SIGTERM -> adapter (PEFT format, task_type SEQ_CLS/TOKEN_CLS),
labels.json, metrics, loss curve and summary on disk. Checkpoints, resume, schedules and the summary are the causal
loop's own.
"""
from __future__ import annotations

import logging
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loraforge.config import TrainConfig
from loraforge.data import IGNORE_INDEX, pad_id_for, read_records
from loraforge.data.encode import PEFT_TASK_TYPES, HeadSpec, collate_head
from loraforge.data.split import sample_few_shot, train_val_split
from loraforge.errors import LoraforgeError
from loraforge.heads import run_head, score_head
from loraforge.models import load_encoder_with_head, require_encoder
from loraforge.lora import LoraConfig, LoraModel
from loraforge.train.loop import (TrainResult, batch_order, check_paths, checkpoint_or_stop, finish_run, finish_step,
                                  start_or_resume, stop_on_signals, track_best)
from loraforge.train.observe import summary_screen

log = logging.getLogger("loraforge")


def train_head(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune `cfg.model` (an encoder) with LoRA and a `cfg.task` head on `cfg.data`; write to `cfg.output`.

    The labels are `cfg.labels`, else the data's (see `HeadSpec.from_records`); with `resume`, the run's own
    labels.json. Validation (`val_data` or `val_split`) reports the loss and the metric (accuracy and macro-F1, or
    entity F1) and keeps the adapter with the best validation loss, as the causal loop does.
    """
    if cfg.task not in PEFT_TASK_TYPES:
        raise LoraforgeError(f"train_head trains seq-cls or token-cls heads, not {cfg.task!r}; use loop.train")
    if cfg.data_format:
        raise LoraforgeError(f"--data-format {cfg.data_format} is for causal-lm; a {cfg.task} head reads its records "
                             "by task (fields renamed by --columns, or a --recipe)")
    output = check_paths(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    require_encoder(cfg.model, cfg.task)
    records = list(read_records(cfg.data, cfg.file_format))
    spec = HeadSpec.load(output) if resume else HeadSpec.from_records(
        cfg.task, records, labels=cfg.labels, recipe=cfg.recipe, columns=cfg.columns,
        skip_bad=cfg.on_bad_record == "skip")
    if cfg.max_examples:  # stratified by label for seq-cls; a plain seeded sample of sentences for token-cls
        label_key = spec.reader.label_field if cfg.task == "seq-cls" else None
        records = sample_few_shot(records, cfg.max_examples, cfg.seed, label_key=label_key)
    torch.manual_seed(cfg.seed)  # the new head's initial weights depend on the seed only
    # "auto" is float32 here: encoders are small, and the head trains in the base's dtype (a bf16 head learns badly)
    model, tokenizer = load_encoder_with_head(cfg.model, cfg.task, len(spec.labels),
                                              torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
    train_set, stats = spec.encode_all(records, tokenizer, cfg.max_length, cfg.on_bad_record)
    log.info("data: %s; labels: %s", stats.summary(), ", ".join(spec.labels))
    for reason in stats.skip_reasons:
        log.warning("skipped: %s", reason)
    if not train_set:
        raise LoraforgeError(f"{cfg.data}: none of its {stats.records_read} records can be used; the first problem "
                             f"was: {stats.skip_reasons[0] if stats.skip_reasons else 'none'}")
    val_set: list = []
    if cfg.val_data:
        val_set, val_stats = spec.encode_all(read_records(cfg.val_data, cfg.file_format), tokenizer, cfg.max_length)
        log.info("validation: %s", val_stats.summary())
    elif cfg.val_split:
        train_set, val_set = train_val_split(train_set, cfg.val_split, cfg.seed)

    torch.manual_seed(cfg.seed)  # LoRA init depends on the seed only, not on what loading consumed
    lm = LoraModel(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=cfg.target_modules, task_type=PEFT_TASK_TYPES[cfg.task],
                                     base_model_name_or_path=cfg.model))
    if not lm.saved_modules:
        raise LoraforgeError(f"{type(model).__name__} has no head named {' or '.join(lm.config.modules_to_save)} to "
                             "train; loraforge knows the heads transformers names classifier or score")
    report = lm.report()
    log.info("%s", report)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler, state, metrics = start_or_resume(cfg, output, lm, resume)
    if not resume:
        spec.save(output)
    params = list(lm.adapter_parameters().values())
    pad_id = pad_id_for(tokenizer)
    micro = batch_order(len(train_set), cfg.batch_size, cfg.max_steps * cfg.grad_accum, cfg.seed)
    val_scores: dict[str, float] = {}

    model.train()
    bar = tqdm(range(state.step + 1, cfg.max_steps + 1), desc="train", disable=not progress, dynamic_ncols=True,
               initial=state.step, total=cfg.max_steps)
    with stop_on_signals() as stop:
        for step in bar:
            start = time.perf_counter()
            batches = [collate_head([train_set[i] for i in idx], pad_id)
                       for idx in micro[(step - 1) * cfg.grad_accum: step * cfg.grad_accum]]
            # every labelled example (seq-cls) or word (token-cls) of the step weighs the same
            step_labels = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            loss_sum = 0.0
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # (B, K) or (B, T, K) -> one row per label
                total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum",
                                        label_smoothing=cfg.label_smoothing)
                (total / max(step_labels, 1)).backward()
                loss_sum += total.item()
            finish_step(cfg, step, loss_sum / max(step_labels, 1), params, optimizer, scheduler, state, metrics, bar,
                        tokens=sum(int(b["attention_mask"].sum()) for b in batches), learned=step_labels, start=start)

            stop_early = False
            if val_set and (step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                predictions, val_sum, val_count = run_head(model, val_set, spec, pad_id, cfg.batch_size)
                val_loss = val_sum / max(val_count, 1)
                scores = score_head(spec, predictions, [e.reference for e in val_set])
                metrics.write(step=step, val_loss=val_loss, **{f"val_{k}": v for k, v in scores.items()})
                bar.write(f"step {step}: val loss {val_loss:.4f}, "
                          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "invalid"))
                improved, stop_early = track_best(cfg, output, lm, state, val_loss)
                val_scores = scores if improved else val_scores
            checkpoint_or_stop(cfg, output, lm, optimizer, scheduler, state, stop.signal)
            if stop_early:
                log.info("early stopping: %d evaluations without improvement", cfg.early_stopping)
                break
    model.eval()
    summary = finish_run(cfg, output, lm, model, state, stats,  # adapter (the best one), loss curve, summary
                         task=cfg.task, labels=list(spec.labels), best_val_scores=val_scores or None)
    if progress:
        tqdm.write(summary_screen(summary), file=sys.stderr)
    return TrainResult(lora=lm, tokenizer=tokenizer, summary=summary)
