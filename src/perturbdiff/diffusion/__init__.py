"""perturbdiff.diffusion: generative processes over cell sets behind one protocol (``loss``, ``sample``), the
conditioning policy they share and the set losses, as plain functions (SPEC §3)."""

from perturbdiff.diffusion._conditioning import (
    COV_KEYS,
    Dropouts,
    doubled,
    draw,
    drop_controls,
    guide,
    self_conditioning,
)
from perturbdiff.diffusion._flow import FlowMatching, ot_pairing
from perturbdiff.diffusion._losses import energy_distance, masked_mse, rbf_mmd, set_loss, set_mean_error
from perturbdiff.diffusion._process import PROCESSES, Process, make_process
from perturbdiff.diffusion._schedule import (
    Schedule,
    eps_from_x0,
    make_schedule,
    q_sample,
    respace_timesteps,
    truncated_timesteps,
    x0_from_eps,
)
from perturbdiff.diffusion._solvers import SOLVERS, euler, heun, odeint, time_grid
from perturbdiff.diffusion._vp import VPDiffusion

__all__ = [
    "Process", "PROCESSES", "make_process", "VPDiffusion", "FlowMatching", "ot_pairing",
    "SOLVERS", "euler", "heun", "odeint", "time_grid",
    "Schedule", "make_schedule", "q_sample", "eps_from_x0", "x0_from_eps", "respace_timesteps", "truncated_timesteps",
    "COV_KEYS", "Dropouts", "draw", "drop_controls", "self_conditioning", "doubled", "guide",
    "energy_distance", "rbf_mmd", "masked_mse", "set_mean_error", "set_loss",
]
