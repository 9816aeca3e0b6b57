"""Data-parallel training under torchrun: the process group from the environment, rank helpers, DDP, seeds.

Engine: ``torch.distributed`` + ``DistributedDataParallel`` (no extra dependency; docs/DISTRIBUTED.md says why).
Without ``WORLD_SIZE > 1`` in the environment nothing here creates a process group and training is one plain
process, exactly as before.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from perturbdiff._errors import ConfigError
from perturbdiff._logging import logger

TIMEOUT = timedelta(hours=1)  # rank 0 validates and writes checkpoints while the others wait in a collective


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank r of W processes, LOCAL_RANK on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device(requested: str | torch.device | None, info: DistInfo) -> torch.device:
    """``None`` or a bare ``cuda`` means cuda:LOCAL_RANK under several processes; anything else is taken as given."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if info.enabled and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", info.local_rank)
    return dev


def setup_distributed(device: str | torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): nccl on CUDA, else gloo.

    An already initialised group is used as it is; ``WORLD_SIZE`` unset or 1 gives one plain process.
    """
    if _initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return info, _device(device, info)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), _device(device, DistInfo())
    if "RANK" not in os.environ or not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 needs RANK and torch.distributed: launch with torchrun (docs/DISTRIBUTED.md)")
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))
    dev = _device(device, info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=dev if dev.type == "cuda" else None)
    atexit.register(cleanup)
    if not info.is_main:  # one voice: the other ranks only report problems
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    logger.info("process group: %d processes, backend %s", world, backend)
    return info, dev


def is_main() -> bool:
    """True on rank 0 (and in a plain single process)."""
    if _initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one is up (safe to call twice; registered at exit by setup_distributed)."""
    if _initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP for the graded forward pass; find_unused_parameters because the last block's control-stream MLP feeds
    nothing (its gradient stays None on every rank, as in one process, so AdamW skips it the same way)."""
    kw: dict = {"find_unused_parameters": True, "device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        kw["forward_sync_buffers"] = False  # buffers (a frozen embedding table) never change: sync once at init
    else:  # pragma: no cover - torch < 2.13
        kw["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kw)


class GradSynced:
    """Calls with autograd on go through DDP (gradient all-reduce); no-grad calls (the self-conditioning pass of
    ``training_loss``) go to the plain module, so DDP sees exactly one graded forward per backward."""

    def __init__(self, ddp: DistributedDataParallel, local: nn.Module):
        self.ddp, self.local = ddp, local

    def __call__(self, *args, **kwargs):
        return (self.ddp if torch.is_grad_enabled() else self.local)(*args, **kwargs)


def step_seeds(seed: int, rank: int, step: int) -> tuple[int, int]:
    """Two 63-bit seeds (loss generator, torch global RNG) for (seed, rank, step) by NumPy's SeedSequence hash."""
    a, b = np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64).tolist()
    return a >> 1, b >> 1


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average of each value over all ranks (for the log; every rank must call it)."""
    if not _initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def from_main(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank; the others wait here while rank 0 validates and saves."""
    if not _initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()
