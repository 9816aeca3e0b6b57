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
        self._pairs: tuple | None = None  # (source module, shadow params, source params, buffer owners)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Update after optimiser step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return
        d = ema_decay(self.decay, step // self.every, self.warmup)
        _, shadow, src, buffers = self._paired(model)
        # torch's multi-tensor EMA step: one lerp over all parameters (the shadow is a copy: same dtypes, device)
        get_ema_multi_avg_fn(d)(shadow, src, None)
        for owner, owner_src, name in buffers:  # read by name: a device move replaces buffers (not parameters)
            getattr(owner, name).copy_(getattr(owner_src, name))

    def _paired(self, model: nn.Module) -> tuple:
        """The shadow's parameters beside the source's of the same name, and the modules owning each buffer, listed
        once per source module: a step then pays no module traversal. Parameters stay the same objects when weights
        are loaded or moved; buffers are looked up by name at each update."""
        if self._pairs is None or self._pairs[0] is not model:
            src, shadow = dict(model.named_parameters()), dict(self.module.named_parameters())
            buffers = []
            for full, _ in self.module.named_buffers():
                path, _, name = full.rpartition(".")
                buffers.append((self.module.get_submodule(path), model.get_submodule(path), name))
            self._pairs = (model, list(shadow.values()), [src[n] for n in shadow], buffers)
        return self._pairs

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
