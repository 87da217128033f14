"""The encoder-head task of the training loop (`--task seq-cls` / `--task token-cls`).

load the encoder with a new head -> read, few-shot sample and encode the data -> (the loop injects LoRA; the head
trains in full: `modules_to_save`, added by task_type as PEFT does) -> batches of encoded examples, cross-entropy per
label, validation loss and the task's metric (accuracy and macro-F1, or entity F1). Checkpoints, resume, schedules
and the summary are the loop's own; the adapter is PEFT's format with task_type SEQ_CLS/TOKEN_CLS, plus labels.json.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.config import TrainConfig, load_quantize
from loraforge.data import IGNORE_INDEX, pad_id_for, read_records
from loraforge.data.encode import PEFT_TASK_TYPES, HeadSpec, collate_head
from loraforge.data.split import sample_few_shot, train_val_split
from loraforge.errors import LoraforgeError
from loraforge.heads import run_head, score_head
from loraforge.lora import LoraModel
from loraforge.models import load_encoder_with_head, require_encoder
from loraforge.train.distributed import Dist
from loraforge.train.run import inject

log = logging.getLogger("loraforge")


class HeadLoss(nn.Module):
    """An encoder with its head and the loss as one module (compiled or wrapped whole): the summed cross-entropy
    over the batch's labelled examples (seq-cls) or words (token-cls)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # (B, K) or (B, T, K) -> one row per label
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=self.label_smoothing)


class HeadTask:
    """Batches of encoded examples for a classifier head, its loss, and validation with the task's metric."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, spec: HeadSpec, train_set: list, val_set: list):
        self.cfg, self.model, self.tokenizer, self.spec = cfg, model, tokenizer, spec
        self.rows, self.val_set = train_set, val_set
        self.pad_id = pad_id_for(tokenizer)
        self.loss = HeadLoss(model, cfg.label_smoothing)
        self.best_scores: dict[str, float] = {}

    @classmethod
    def prepare(cls, cfg: TrainConfig, output: Path, resume: bool, dist: Dist) -> tuple[HeadTask, object]:
        """Load the encoder with a new head and encode the data; (task, data stats). The labels are `cfg.labels`,
        else the data's (see `HeadSpec.from_records`); with `resume`, the run's own labels.json."""
        if cfg.task not in PEFT_TASK_TYPES:
            raise LoraforgeError(f"a head trains seq-cls or token-cls, not {cfg.task!r}")
        if cfg.data_format:
            raise LoraforgeError(f"--data-format {cfg.data_format} is for causal-lm; a {cfg.task} head reads its "
                                 "records by task (fields renamed by --columns, or a --recipe)")
        if dist.world > 1 and cfg.strategy == "fsdp":
            raise LoraforgeError("--strategy fsdp shards decoder layers; train encoder heads with --strategy ddp")
        require_encoder(cfg.model, cfg.task)
        records = list(read_records(cfg.data, cfg.file_format))
        spec = HeadSpec.load(output) if resume else HeadSpec.from_records(
            cfg.task, records, labels=cfg.labels, recipe=cfg.recipe, columns=cfg.columns,
            skip_bad=cfg.on_bad_record == "skip")
        if cfg.max_examples:  # stratified by label for seq-cls; a plain seeded sample of sentences for token-cls
            label_key = spec.reader.label_field if cfg.task == "seq-cls" else None
            records = sample_few_shot(records, cfg.max_examples, cfg.seed, label_key=label_key)
        torch.manual_seed(cfg.seed)  # the new head's initial weights depend on the seed only
        # "auto" is float32 here: encoders are small, and the head trains in the base's dtype (a bf16 head learns
        # badly)
        model, tokenizer = load_encoder_with_head(cfg.model, cfg.task, len(spec.labels),
                                                  torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                                                  load_quantize(cfg))
        train_set, stats = spec.encode_all(records, tokenizer, cfg.max_length, cfg.on_bad_record)
        log.info("data: %s; labels: %s", stats.summary(), ", ".join(spec.labels))
        for reason in stats.skip_reasons:
            log.warning("skipped: %s", reason)
        if not train_set:
            raise LoraforgeError(f"{cfg.data}: none of its {stats.records_read} records can be used; the first "
                                 f"problem was: {stats.skip_reasons[0] if stats.skip_reasons else 'none'}")
        val_set: list = []
        if cfg.val_data:
            val_set, val_stats = spec.encode_all(read_records(cfg.val_data, cfg.file_format), tokenizer,
                                                 cfg.max_length)
            log.info("validation: %s", val_stats.summary())
        elif cfg.val_split:
            train_set, val_set = train_val_split(train_set, cfg.val_split, cfg.seed)
        return cls(cfg, model.to(dist.device), tokenizer, spec, train_set, val_set), stats

    def inject(self, cfg: TrainConfig, output: Path, resume: bool, dist: Dist) -> LoraModel:
        lm = inject(self.model, cfg, PEFT_TASK_TYPES[cfg.task])
        if not lm.saved_modules:
            raise LoraforgeError(f"{type(self.model).__name__} has no head named "
                                 f"{' or '.join(lm.config.modules_to_save)} to train; loraforge knows the heads "
                                 "transformers names classifier or score")
        if not resume and dist.main:
            self.spec.save(output)
        return lm

    def layers(self) -> list[nn.Module]:
        return []

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_head([self.rows[i] for i in indices], self.pad_id)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())  # every labelled example or word weighs the same

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def context(self, batch: dict[str, torch.Tensor]):
        return contextlib.nullcontext()

    def training(self):
        return contextlib.nullcontext()

    def validate(self, forward, batch_size: int) -> tuple[float, dict, str]:
        out = run_head(self.model, self.val_set, self.spec, self.pad_id, batch_size)
        val_loss = out.loss_sum / max(out.count, 1)
        scores = score_head(self.spec, out.predictions, [e.reference for e in self.val_set])
        line = f"val loss {val_loss:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "invalid")
        return val_loss, {f"val_{k}": v for k, v in scores.items()}, line

    def summary_extra(self) -> dict:
        scores = {k.removeprefix("val_"): v for k, v in self.best_scores.items()}
        return {"task": self.cfg.task, "labels": list(self.spec.labels), "best_val_scores": scores or None}

    def write_extra(self, output: Path, stats) -> None:
        pass
