"""Exponential moving average of weights (ref decay 0.99, updated every 10 steps) with a warm-up; sampling uses it."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_decay(decay: float, n_updates: int, warmup: bool = True) -> float:
    """Decay of the ``n_updates``-th update (1-based): ``min(decay, (1 + n) / (10 + n))`` with the warm-up.

    Without it the average starts as the random initialisation and, at 0.999 per step, still holds 13.5 % of it
    after 2,000 steps; with it the first updates nearly copy the weights and the window grows to ``decay``'s.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + n_updates) / (10.0 + n_updates))


class EMA:
    """Shadow copy of a module's parameters and buffers, ``shadow = d_n·shadow + (1−d_n)·param``.

    ``d_n`` follows :func:`ema_decay` with n the number of updates so far, derived from the optimiser step, so a
    resumed run continues the same sequence without extra state.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, every: int = 10, warmup: bool = True):
        self.decay, self.every, self.warmup = decay, max(1, every), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Update after optimiser step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return
        d = ema_decay(self.decay, step // self.every, self.warmup)
        src, shadow = dict(model.named_parameters()), dict(self.module.named_parameters())
        # torch's multi-tensor EMA step: one lerp over all parameters (the shadow is a copy: same dtypes, device)
        get_ema_multi_avg_fn(d)(list(shadow.values()), [src[name].detach() for name in shadow], None)
        src_b = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
