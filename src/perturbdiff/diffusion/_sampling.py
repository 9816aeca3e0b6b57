"""Deterministic DDIM sampling (η = 0), self-conditioning and ε-space classifier-free guidance (SPEC §3)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from perturbdiff.diffusion._losses import _draw
from perturbdiff.diffusion._schedule import (
    Schedule,
    eps_from_x0,
    respace_timesteps,
    truncated_timesteps,
    x0_from_eps,
)


def sampling_timesteps(sched: Schedule, steps: int, start: str, truncated_start_t: int) -> list[int]:
    """Descending timesteps: "full" = `steps` respaced from T−1 to 0; "truncated" = start_t, …, 1, 0."""
    if start == "full":
        return respace_timesteps(sched.T, steps).tolist()
    if start == "truncated":
        if truncated_start_t >= sched.T:
            raise ValueError(f"truncated_start_t={truncated_start_t} must be < T={sched.T}")
        return truncated_timesteps(truncated_start_t).tolist()
    raise ValueError(f"unknown sampler start {start!r}; choose 'full' or 'truncated'")


def _guided_x0(
    model: nn.Module,
    sched: Schedule,
    x: torch.Tensor,
    x_self: torch.Tensor,
    x_ctrl2: torch.Tensor,
    t: int,
    cov2: dict,
    uncond: torch.Tensor,
    w: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched cond+uncond pass; ε̃ = (1+w)·ε_cond − w·ε_uncond, returned as x0 = (x_t − √(1−ᾱ)ε̃)/√ᾱ."""
    tt = torch.full((x_self.shape[0],), t, device=x.device, dtype=torch.long)  # (2B,)
    out = model(torch.cat([x, x]), x_self, x_ctrl2, tt, cov2, uncond).float()  # (2B, S, G)
    x0_c, x0_u = out.chunk(2)
    t1 = tt[: x.shape[0]]
    eps = (1 + w) * eps_from_x0(sched, x, t1, x0_c) - w * eps_from_x0(sched, x, t1, x0_u)  # (B, S, G)
    return x0_from_eps(sched, x, t1, eps).clamp_min(0.0), out


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    sched: Schedule,
    x_ctrl: torch.Tensor,
    cov: dict,
    *,
    steps: int = 50,
    guidance: float = 0.0,
    start: str = "full",
    truncated_start_t: int = 99,
    generator: torch.Generator | None = None,
    zero_threshold: float = 1e-4,
    clip_max: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM, η = 0 (Song et al. 2021): x_{t'} = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·ε̂ from pure noise; returns last x̂0.

    Self-conditioning feeds each branch its own previous x̂0. With guidance w ≠ 0 the conditional and
    unconditional passes run as one forward of a doubled batch; w = 0 is a single conditional pass. The
    model is put in eval mode for the call and restored. For a zero control stream (marginal pretraining)
    pass zeros as `x_ctrl`.
    """
    ts = sampling_timesteps(sched, steps, start, truncated_start_t)
    b = x_ctrl.shape[0]
    x = _draw("randn", tuple(x_ctrl.shape), generator, x_ctrl.device)  # (B, S, G)
    guided = guidance != 0.0
    if guided:
        x_ctrl = torch.cat([x_ctrl, x_ctrl])  # (2B, S, G)
        cov = {k: torch.cat([v, v]) for k, v in cov.items()}
        uncond = torch.arange(2 * b, device=x.device) >= b  # (2B,): second half unconditional
    x_self = torch.zeros(x_ctrl.shape, device=x.device)  # (B|2B, S, G)
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM", leave=False)):
            t_b = torch.full((b,), t, device=x.device, dtype=torch.long)  # (B,)
            if guided:
                x0, x_self = _guided_x0(model, sched, x, x_self, x_ctrl, t, cov, uncond, guidance)
            else:
                x0 = x_self = model(x, x_self, x_ctrl, t_b, cov).float()  # (B, S, G)
            if clip_max is not None:
                x0 = x0.clamp_max(clip_max)
            eps = eps_from_x0(sched, x, t_b, x0)  # (B, S, G)
            abar_prev = float(sched.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x = abar_prev**0.5 * x0 + (1.0 - abar_prev) ** 0.5 * eps
    finally:
        model.train(was_training)
    x0 = x0.masked_fill(x0 < zero_threshold, 0.0)
    return x0 if clip_max is None else x0.clamp_max(clip_max)
