"""AdamW with parameter groups and the warm-up → plateau → cosine learning-rate schedule (SPEC §4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from perturbdiff.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms, embeddings' null vectors and other 1-d tensors do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (ref betas 0.9/0.98, eps 1e-8, weight decay 0.01 on matrices only)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True
    )  # foreach: one fused update per group instead of a Python loop over parameters


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, plateau, cosine decay to ``min_lr_ratio``."""
    total = max(cfg.max_steps, 1)
    warm = min(cfg.warmup_steps, total)
    if step < warm:
        return (step + 1) / warm
    plateau_end = warm + int(cfg.plateau_fraction * (total - warm))
    if step < plateau_end:
        return 1.0
    progress = min(1.0, (step - plateau_end) / max(1, total - plateau_end))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Apply the schedule for ``step``; returns the LR."""
    lr = cfg.lr * lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
