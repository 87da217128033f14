"""Checkpoints that survive a kill -9 at any moment, and the state that makes a resumed run identical.

`OUTPUT/checkpoints/step-N/` holds the adapter (PEFT format), `optimizer.safetensors` (AdamW moments, RNG state) and
`trainer_state.json`. It is built as `.tmp-step-N/` and renamed into place, so a folder named `step-N` is always
complete. Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraforge.errors import LoraforgeError
from loraforge.lora import LoraModel, save_adapter
from loraforge.lora.adapter import write_adapter
from loraforge.lora.model import whole
from loraforge.train.distributed import Dist
from loraforge.lora.adapter import ADAPTER_WEIGHTS

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    learned_tokens: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    scheduler: dict = field(default_factory=dict)
    param_groups: list[dict] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output: Path, lm: LoraModel, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, keep: int,
                    dist: Dist = Dist()) -> Path:
    """Write `checkpoints/step-N` atomically, then drop all but the newest `keep` step folders. Under torchrun every
    rank calls it: each writes its own RNG state (`rng-rank-R.safetensors`, beside the folder until rank 0 moves it
    in), rank 0 the rest; every rank returns once the folder is complete."""
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    adapter = lm.adapter_state_dict()  # on every rank: FSDP2's shards are gathered here
    tensors, groups = _optimizer_tensors(optimizer)
    if dist.world > 1:
        save_file(_rng_tensors(), root / f".rng-step-{state.step}-rank-{dist.rank}.safetensors")
        dist.barrier()
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_adapter(tmp, adapter, lm.config)  # as trained (a PiSSA start too): what --resume loads back
        tensors.update(_rng_tensors())
        save_file(tensors, tmp / TENSORS_FILE)
        for r in range(1, dist.world):
            os.replace(root / f".rng-step-{state.step}-rank-{r}.safetensors", tmp / f"rng-rank-{r}.safetensors")
        state.scheduler = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state.param_groups = groups
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # the folder is complete before any rank goes on
    return final


def _rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator, and each CUDA device's when CUDA is in use."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.torch_cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.torch_cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(output: Path) -> list[Path]:
    """Complete step folders, oldest first. Half-written `.tmp-*` folders are never listed."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def load_checkpoint(path: Path, lm: LoraModel, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0) -> TrainerState:
    """Restore adapter weights, AdamW moments, scheduler and this rank's RNG from `path`; the trainer state."""
    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        tensors = load_file(path / TENSORS_FILE)
        adapter = load_file(path / ADAPTER_WEIGHTS)
    except (OSError, ValueError, TypeError) as err:
        raise LoraforgeError(f"checkpoint {path} cannot be read ({err}); delete it to resume from an earlier one") from None
    params = lm.adapter_parameters()
    with torch.no_grad():
        for key, value in adapter.items():
            name = key.removeprefix("base_model.model.")
            if name not in params or params[name].shape != value.shape:
                raise LoraforgeError(f"checkpoint {path} does not match this run's adapter (key {key}); "
                                     "resume with the same options the run started with")
            params[name].copy_(_like(value, params[name]))
    optimizer.load_state_dict(_optimizer_state(tensors, state.param_groups, optimizer))
    scheduler.load_state_dict({**scheduler.state_dict(), **state.scheduler})
    rank_rng = path / f"rng-rank-{rank}.safetensors"
    _set_rng(load_file(rank_rng) if rank and rank_rng.is_file() else tensors)
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as whole tensors (FSDP2's sharded moments gathered: a collective, every rank calls it)."""
    sd = optimizer.state_dict()
    tensors = {f"state.{idx}.{name}": whole(t).detach().cpu().contiguous()
               for idx, entries in sd["state"].items() for name, t in entries.items()}
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict], optimizer: torch.optim.Optimizer) -> dict:
    """The state dict `optimizer.load_state_dict` takes, each moment laid out as its parameter is (sharded again
    under FSDP2, on the parameter's device)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            param = params[int(idx)]
            state.setdefault(int(idx), {})[name] = _like(value, param) if value.shape == param.shape else value
    return {"state": state, "param_groups": groups}


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor from a file) laid out as `param`: a DTensor with its mesh and placements (a
    collective: every rank calls it), else on its device and in its dtype."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=param.dtype)


def save_best(output: Path, lm: LoraModel, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Keep the adapter with the best validation loss in `checkpoints/best`, swapped in whole."""
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    best, tmp, old = root / "best", root / ".tmp-best", root / ".old-best"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(lm, tmp, state)
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best
