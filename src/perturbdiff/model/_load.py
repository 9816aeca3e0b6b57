"""Loading whichever run a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

from perturbdiff.model._perturbdiff import PerturbDiff
from perturbdiff.model._pretrained import Pretrained
from perturbdiff.model._run import PRETRAIN, TASK, checkpoint_kind


def load_run(path: str | Path, *, which: str = "best", **kwargs):
    """A ``PerturbDiff`` or a ``Pretrained``, whichever kind wrote the checkpoint."""
    kinds = {TASK: PerturbDiff, PRETRAIN: Pretrained}
    return kinds[checkpoint_kind(path, which)].load(path, which=which, **kwargs)
