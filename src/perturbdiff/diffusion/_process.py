"""The process protocol: what the trainer and the model objects know of a generative process (docs/DESIGN.md)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from perturbdiff.config import DiffusionConfig, SampleConfig
from perturbdiff.diffusion._flow import FlowMatching
from perturbdiff.diffusion._vp import VPDiffusion


class Process(Protocol):
    """A generative process over cell sets in model space.

    ``loss`` draws everything random from ``generator`` (and label dropout from the global generators) and returns
    the loss to back-propagate with its logged parts; ``sample`` generates one target set per control set.
    """

    kind: str

    def loss(self, network: nn.Module, batch: dict, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def sample(self, network: nn.Module, controls: torch.Tensor, covariates: dict, settings: SampleConfig,
               generator: torch.Generator | None = None, *, progress: bool = False) -> torch.Tensor: ...


#: process kind (``diffusion.process``) -> class; a new process is one file here and one entry
PROCESSES: dict[str, type] = {"vp": VPDiffusion, "flow": FlowMatching}


def make_process(cfg: DiffusionConfig, codec=None) -> Process:
    """The configured process; the codec (perturbdiff.data) tells the output form: non-negativity and clipping."""
    kind = PROCESSES[cfg.process]
    if codec is None:
        return kind(cfg)
    return kind(cfg, nonnegative=codec.nonnegative, clip=codec.clip)
