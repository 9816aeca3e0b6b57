"""THE loader: batches of cell sets from a position counted in sets, sharded over ranks, resumable exactly.

Training, the benchmarks and the tests read sets through :class:`SetLoader` only. An epoch is the data set's order
for ``(seed, epoch)``; a global batch is the next W·B sets of it and rank r reads positions r, r + W, ...
(:func:`shard_batches`). The position (epoch, sets consumed) is all a checkpoint needs to continue at the same set,
with any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, default_collate

from perturbdiff._errors import DataError


class SetBatch(list):
    """What ``__getitems__`` returns: per-set dicts (for any collate fn) plus the already batched dict."""

    def __init__(self, batched: dict[str, torch.Tensor]):
        super().__init__({k: v[i] for k, v in batched.items()} for i in range(len(batched["cond"])))
        self.batched = batched


def collate_sets(items):
    """Collate fn: a SetBatch's batched dict as it is (no copy), otherwise torch's default stacking."""
    return items.batched if isinstance(items, SetBatch) else default_collate(items)


def shard_batches(
    n_sets: int, start: int, batch_sets: int, *, rank: int = 0, world_size: int = 1
) -> list[tuple[range, int]]:
    """Rank r's micro-batches of an epoch's set order from position ``start``, each with its global batch size.

    A global batch is the next W·B sets of the order (the last one may be smaller); rank r takes its positions
    r, r + W, ... so the ranks are disjoint and equally loaded. The last (n_sets − start) mod W sets of the epoch
    are skipped (none when W = 1). ``start`` counts sets, so a run resumed with another W continues where it was.
    """
    W, step = int(world_size), int(world_size) * int(batch_sets)
    end = max(start, n_sets - (n_sets - start) % W)
    return [(range(q + rank, min(q + step, end), W), min(q + step, end) - q) for q in range(start, end, step)]


class SetLoader:
    """Batched dicts of a set data set (``CellSetDataset``, ``MarginalSetDataset``) from the current position.

    ``iter(loader)`` gives the rest of the current epoch (all of it at position 0) and moves the position on;
    :meth:`stream` gives batches epoch after epoch, for as long as they are read. ``epoch`` and ``sets_in_epoch``
    count sets of all ranks together; :meth:`seek` sets them (resume). Worker processes and batch order draw from
    a generator of ``seed``, never from the global RNG.
    """

    def __init__(self, dataset, batch_sets: int, *, num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if batch_sets < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_sets >= 1 and 0 <= rank < world_size, got {batch_sets}, {rank}, {world_size}")
        self.dataset, self.batch_sets, self.num_workers = dataset, int(batch_sets), int(num_workers)
        self.pin_memory, self.rank, self.world_size, self.seed = pin_memory, int(rank), int(world_size), int(seed)
        self.epoch, self.sets_in_epoch = int(getattr(dataset, "epoch", 0)), 0

    def seek(self, epoch: int, sets_in_epoch: int = 0) -> None:
        """Continue at set ``sets_in_epoch`` of epoch ``epoch`` (counted over all ranks)."""
        self.epoch, self.sets_in_epoch = int(epoch), int(sets_in_epoch)

    def _plan(self) -> list[tuple[range, int]]:
        return shard_batches(len(self.dataset), self.sets_in_epoch, self.batch_sets, rank=self.rank,
                             world_size=self.world_size)

    def __len__(self) -> int:
        """Batches this rank reads in the rest of the current epoch."""
        return len(self._plan())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.set_epoch(self.epoch)
        plan = self._plan()
        if not plan:  # nothing of this epoch left for this world size (its last sets are skipped)
            self.epoch, self.sets_in_epoch = self.epoch + 1, 0
            return
        loader = DataLoader(self.dataset, batch_sampler=[idx for idx, _ in plan], num_workers=self.num_workers,
                            collate_fn=collate_sets, persistent_workers=False, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed))  # keeps the global RNG untouched
        for j, (batch, (_, n_global)) in enumerate(zip(loader, plan)):
            self.sets_in_epoch += n_global
            if j == len(plan) - 1:  # the epoch is used up: the position moves on at once
                self.epoch, self.sets_in_epoch = self.epoch + 1, 0
            yield batch

    def stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position on, epoch after epoch."""
        while True:
            if self.sets_in_epoch == 0 and not self._plan():
                raise DataError(f"the training data give {len(self.dataset)} sets, too few for {self.world_size} "
                                "process(es)")
            yield from self


def make_loader(dataset, batch_sets: int, **kwargs) -> SetLoader:
    """Batches of B sets: target/control [B, S, G], pad [B, S], pert [B, P], context [B, C], cond [B], ...

    Keyword arguments are those of :class:`SetLoader` (num_workers, pin_memory, rank, world_size, seed).
    """
    return SetLoader(dataset, batch_sets, **kwargs)
