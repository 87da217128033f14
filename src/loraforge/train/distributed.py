"""torch.distributed for training, in nanoGPT's few visible lines: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we join
the process group (gloo on CPU, nccl on CUDA) and say which device this rank uses. Nothing homemade: gradients are
averaged by DDP or FSDP2, counts are summed by `all_reduce`.

`Dist` is what the loop sees: its rank and world size, `main` (rank 0, the only one that writes), `sum` (numbers
summed over ranks, e.g. the step's learned-token count) and `agree` (a stop decision every rank takes together).
With one process every method is the identity, so world size 1 runs the plain loop bit for bit.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loraforge.errors import LoraforgeError

log = logging.getLogger("loraforge")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over every rank (float64, so token counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def agree(self, flag: int | None) -> int | None:
        """The largest of every rank's `flag` (a signal number, or None): all ranks stop at the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([flag or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def check_global_batch(batch_size: int, world: int) -> None:
    """--batch-size is the global batch: each of the `world` processes takes an equal share of it."""
    if batch_size % world:
        raise LoraforgeError(f"--batch-size {batch_size} is the global batch: it must divide by the {world} "
                             f"processes; use a multiple of {world}")


def setup(device: str = "cpu") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); the rank's device. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise LoraforgeError(f"--device {device}: this machine has no CUDA GPU that torch can use; use cpu")
        index = int(device.split(":")[1]) if ":" in device else local
        torch.cuda.set_device(index)
        where = torch.device("cuda", index)
    else:
        where = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=where if cuda else None)
        log.info("rank %d of %d on %s (%s)", rank, world, where, dist.get_backend())
    return Dist(rank, world, where)


def wrap(module: nn.Module, run_dist: Dist, strategy: str, layers: list[nn.Module]) -> nn.Module:
    """The module every step's forward goes through: DDP around it, or FSDP2's `fully_shard` on each decoder layer
    and then on it; unchanged for one process."""
    if run_dist.world == 1:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [run_dist.device.index] if run_dist.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    raise LoraforgeError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")


def no_sync(forward: nn.Module, last: bool):
    """No gradient all-reduce on a micro-step that is not the step's last (DDP's `no_sync`; FSDP2's
    `set_requires_gradient_sync`)."""
    if last:
        return nullcontext()
    if hasattr(forward, "no_sync"):
        return forward.no_sync()
    if hasattr(forward, "set_requires_gradient_sync"):
        return _FsdpNoSync(forward)
    return nullcontext()


class _FsdpNoSync:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
