"""Exponential moving average of weights (ref decay 0.99, updated every 10 steps); sampling uses it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of a module's parameters and buffers, ``shadow = d·shadow + (1−d)·param``."""

    def __init__(self, model: nn.Module, decay: float = 0.99, every: int = 10):
        self.decay, self.every = decay, max(1, every)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Update after optimiser step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return
        src = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - self.decay)
        src_b = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
