"""Inject LoRA into a transformers model, freeze the rest, and manage the adapter's state.

`LoraModel` is a handle, not a wrapper module: `lm.model` is still the transformers model (forward, generate,
save_pretrained all work on it), with LoRA layers swapped in place of the targeted modules.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.lora.config import LoraConfig
from loraforge.lora.layer import _LoraBase, wrap
from loraforge.lora.targets import check_no_lora, find_targets, replace_module
from loraforge.quant.linear import PackedWeight, weight_count

PEFT_PREFIX = "base_model.model."
# PeftModelForSequenceClassification / ...ForTokenClassification add these to modules_to_save whatever the user gave
# (peft 0.21.2, peft_model.py), so the new head trains and is saved with the adapter.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
_HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a classifier head): a trainable copy beside the frozen original, as in PEFT."""

    is_lora_wrapper = True

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = copy.deepcopy(original)
        self.disabled = False

    def forward(self, *args, **kwargs):
        module = self.original_module if self.disabled else self.modules_to_save
        return module(*args, **kwargs)


@dataclass(frozen=True)
class ParamReport:
    """Trainable parameters and the memory they imply. Memory excludes activations."""

    trainable: int
    total: int
    adapter_bytes: int
    train_memory_bytes: int  # frozen weights + trainable fp32 weight, grad and two AdamW moments
    full_ft_memory_bytes: int  # every weight, grad and two AdamW moments in fp32

    def __str__(self) -> str:
        gb = 1024**3
        return (f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.trainable / self.total:.4f}%)"
                f" | adapter file ~{self.adapter_bytes / 1024**2:.2f} MiB"
                f" | est. training memory (no activations) {self.train_memory_bytes / gb:.2f} GiB"
                f" vs full fine-tuning {self.full_ft_memory_bytes / gb:.2f} GiB")


def whole(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a tensor sharded by FSDP2 (a DTensor) is gathered, a collective every rank must call."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class LoraModel:
    """A transformers model with one LoRA adapter injected, and the config that made it."""

    def __init__(self, model: nn.Module, config: LoraConfig):
        if config.task_type in _HEAD_TASK_TYPES:  # as PEFT does; PEFT also repeats names, we keep each once
            names = list(dict.fromkeys([*(config.modules_to_save or []), *CLASSIFIER_HEAD_NAMES]))
            config = dataclasses.replace(config, modules_to_save=names)
        check_no_lora(model)
        self.model = model
        self.config = config
        self.layers: dict[str, _LoraBase] = {}
        self.saved_modules: dict[str, ModulesToSave] = {}
        for path in find_targets(model, config):
            r, alpha = config.rank_and_alpha(path)
            base = model.get_submodule(path)
            self.layers[path] = wrap(base, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                                     config.init_lora_weights).train(base.training)  # a model in eval stays in eval
            replace_module(model, path, self.layers[path])
        for path, module in list(model.named_modules()):
            if any(path == m or path.endswith("." + m) for m in config.modules_to_save or []):
                if isinstance(module, PackedWeight):
                    raise LoraforgeError(f"modules_to_save: {path} is packed (--quantize nf4-all packs the embedding "
                                         "and head) and cannot be trained; use --quantize nf4 or nf4-dq, which keep "
                                         "them dense, or leave it out of modules_to_save")
                self.saved_modules[path] = ModulesToSave(module).train(module.training)
                replace_module(model, path, self.saved_modules[path])
        self.set_trainable(True)

    # ---- parameters -------------------------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the adapter owns, by the key it has in the adapter file (without the PEFT prefix)."""
        params: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):
                    params[f"{path}.{name}"] = p
        for path, wrapper in self.saved_modules.items():
            for name, p in wrapper.modules_to_save.named_parameters():
                params[f"{path}.{name}"] = p
        if self.config.bias != "none":
            bias_owners = self.model.named_modules() if self.config.bias == "all" else \
                ((f"{path}.base_layer", layer.base_layer) for path, layer in self.layers.items())
            for path, module in bias_owners:
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter) and not any(path.startswith(f"{p}.original_module")
                                                              or path.startswith(f"{p}.modules_to_save")
                                                              for p in self.saved_modules):
                    params[f"{path}.bias"] = bias
        return params

    def set_trainable(self, trainable: bool) -> None:
        """Freeze everything, then (if trainable) unfreeze exactly the adapter's parameters."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.adapter_parameters().values():
            p.requires_grad_(trainable)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as PEFT saves it: `base_model.model.<path>.lora_A.weight` and so on."""
        return {PEFT_PREFIX + k: whole(p).detach() for k, p in self.adapter_parameters().items()}

    def saved_form(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        """The tensors and config an adapter file holds for `state` (`adapter_state_dict()`): as they are, or, for
        a PiSSA start, an ordinary adapter on the original base, as PEFT's `save_pretrained(...,
        path_initial_model_for_weight_conversion=...)` writes it: the trained layer is W − s·B0A0 + s·B A =
        W + s·(B A − B0 A0) = W + s·[B, −B0] [A; A0], rank 2r at the same scaling (lora_alpha doubled, or ×√2 with
        rsLoRA, and the patterns likewise). It loads anywhere, PEFT included, with no PiSSA step."""
        starts = {path: layer.pissa_start for path, layer in self.layers.items()
                  if getattr(layer, "pissa_start", None) is not None}
        if not starts:
            return state, self.config
        tensors = dict(state)
        for path, (a0, b0) in starts.items():
            key_a, key_b = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
            a, b = tensors[key_a], tensors[key_b]
            tensors[key_a] = torch.cat([a, a0.to(a.device, a.dtype)], dim=0)  # (2r, in)
            tensors[key_b] = torch.cat([b, -b0.to(b.device, b.dtype)], dim=1)  # (out, 2r)
        cfg = self.config
        grow = 2 ** 0.5 if cfg.use_rslora else 2.0  # s = alpha/r (or alpha/sqrt r) unchanged at rank 2r
        config = dataclasses.replace(cfg, r=2 * cfg.r, lora_alpha=grow * cfg.lora_alpha, init_lora_weights=True,
                                     rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                                     alpha_pattern={k: grow * v for k, v in cfg.alpha_pattern.items()})
        return tensors, config

    def report(self) -> ParamReport:
        params = self.adapter_parameters()
        trainable = sum(p.numel() for p in params.values())
        total, frozen_bytes = weight_count(self.model)  # tied weights once, packed ones at their real size
        return ParamReport(
            trainable=trainable, total=total,
            adapter_bytes=sum(p.numel() * p.element_size() for p in params.values()),
            train_memory_bytes=frozen_bytes + trainable * 4 * 3,
            full_ft_memory_bytes=total * 4 * 4,
        )

    # ---- merge ------------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    def merge(self) -> None:
        """Fold every LoRA update into its base weight (fp32 math, NaN-checked). Idempotent, all or nothing."""
        self._check_untied()
        merged_now: list[_LoraBase] = []
        try:
            for path, layer in self.layers.items():
                if not layer.merged:
                    layer.merge(path)
                    merged_now.append(layer)
        except LoraforgeError:  # a broken layer: undo the ones merged before it, so no model is half-merged
            for layer in merged_now:
                layer.unmerge()
            raise

    def _check_untied(self) -> None:
        # A weight shared with another module (tied embeddings: embed_tokens and lm_head) would change for both.
        owners: dict[int, list[str]] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and not path.endswith(".original_module"):
                owners.setdefault(id(weight), []).append(path)
        for path, layer in self.layers.items():
            weight = getattr(layer.base_layer, "weight", None)  # a packed base has none to share
            sharing = [p for p in owners.get(id(weight), []) if p != f"{path}.base_layer"]
            if sharing:
                raise LoraforgeError(
                    f"cannot merge LoRA into {path}: its weight is tied to {sharing[0]}, so merging would change "
                    "both. Keep the adapter unmerged, or train without targeting tied embeddings")

    def unmerge(self) -> None:
        """Restore the exact base weights. Idempotent."""
        for layer in self.layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, then put the plain base modules back: a model with no trace of LoRA. This handle is spent."""
        self.merge()
        for layer in self.layers.values():
            layer.forget_unmerged()  # the merged weight stays
        return self._take_out(trained_heads=True)

    def unload(self) -> nn.Module:
        """Put the plain base modules back without merging: the model as it was before injection. This handle is
        spent (its layers keep the adapter's weights, detached from the model)."""
        self.unmerge()
        return self._take_out(trained_heads=False)

    def _take_out(self, trained_heads: bool) -> nn.Module:
        """Every wrapper replaced by its base module (a head by its trained copy, or by the original), all frozen."""
        for path, layer in self.layers.items():
            replace_module(self.model, path, layer.base_layer)
        for path, wrapper in self.saved_modules.items():
            replace_module(self.model, path, wrapper.modules_to_save if trained_heads else wrapper.original_module)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers, self.saved_modules = {}, {}
        return self.model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (unmerging first if needed, re-merging after)."""
        was_merged = self.merged
        self.unmerge()
        switches = [*self.layers.values(), *self.saved_modules.values()]
        for s in switches:
            s.disabled = True
        try:
            yield
        finally:
            for s in switches:
                s.disabled = False
            if was_merged:
                self.merge()

