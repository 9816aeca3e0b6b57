"""perturbdiff.diffusion: the VP diffusion process over cell sets (SPEC §3), plain functions of the model."""

from perturbdiff.diffusion._losses import energy_distance, rbf_mmd, training_loss
from perturbdiff.diffusion._sampling import ddim_sample, sampling_timesteps
from perturbdiff.diffusion._schedule import (
    Schedule,
    eps_from_x0,
    make_schedule,
    q_sample,
    respace_timesteps,
    truncated_timesteps,
    x0_from_eps,
)

__all__ = [
    "Schedule",
    "make_schedule",
    "q_sample",
    "eps_from_x0",
    "x0_from_eps",
    "respace_timesteps",
    "truncated_timesteps",
    "sampling_timesteps",
    "energy_distance",
    "rbf_mmd",
    "training_loss",
    "ddim_sample",
]
