"""Variance-preserving noise schedule, forward noising and the x0 <-> ε conversions (DDPM; SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Tensors of a discrete VP schedule, all float32 of length T on the CPU (gathered onto t's device)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Linear β schedule (Ho et al. 2020): β_t = linspace(β_start, β_end), ᾱ_t = Π_{s<=t} (1 − β_s)."""
    if T < 1 or not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"invalid schedule T={T}, beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    return Schedule(
        betas=betas.float(),
        alphas=alphas.float(),
        alphas_cumprod=abar.float(),
        sqrt_alphas_cumprod=abar.sqrt().float(),
        sqrt_one_minus_alphas_cumprod=(1.0 - abar).sqrt().float(),
    )


def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast over (B, S, G)."""
    return values.to(t.device)[t].reshape(-1, 1, 1)  # (B, 1, 1)


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    return _at(sched.sqrt_alphas_cumprod, t) * x0 + _at(sched.sqrt_one_minus_alphas_cumprod, t) * noise


def eps_from_x0(sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε implied by an x0 estimate: ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t)."""
    return (x_t - _at(sched.sqrt_alphas_cumprod, t) * x0) / _at(sched.sqrt_one_minus_alphas_cumprod, t)


def x0_from_eps(sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 implied by an ε estimate: x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    return (x_t - _at(sched.sqrt_one_minus_alphas_cumprod, t) * eps) / _at(sched.sqrt_alphas_cumprod, t)


def respace_timesteps(T: int, steps: int) -> torch.Tensor:
    """Evenly respaced DDIM timesteps from T−1 down to 0 (distinct, descending, `min(steps, T)` of them)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    ts = torch.linspace(T - 1, 0, min(steps, T), dtype=torch.float64).round().long()
    return torch.unique_consecutive(ts)


def truncated_timesteps(start_t: int) -> torch.Tensor:
    """The authors' sampler timesteps: start_t, start_t − 1, …, 0 (step 1)."""
    if start_t < 0:
        raise ValueError(f"truncated_start_t must be >= 0, got {start_t}")
    return torch.arange(start_t, -1, -1, dtype=torch.long)
