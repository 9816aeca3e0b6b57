"""VP diffusion over cell sets: x0-prediction training, deterministic DDIM sampling (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from perturbdiff.config import DiffusionConfig, SampleConfig
from perturbdiff.diffusion._conditioning import (
    COV_KEYS,
    Dropouts,
    doubled,
    draw,
    drop_controls,
    guide,
    only_kwargs,
    output_form,
    self_conditioning,
)
from perturbdiff.diffusion._losses import set_loss
from perturbdiff.diffusion._schedule import (
    eps_from_x0,
    make_schedule,
    q_sample,
    respace_timesteps,
    truncated_timesteps,
    x0_from_eps,
)


class VPDiffusion:
    """The ``"vp"`` process: linear-β VP schedule, the network predicts x0, DDIM (η = 0) samples.

    ``nonnegative`` and ``clip`` come from the codec: x̂0 is ReLU'd (and guided x̂0 clamped at 0) in a non-negative
    model space, and ``clip`` bounds every x̂0 while sampling. With ``control_skip`` the network predicts x0 minus the
    control set's mean profile.
    """

    kind = "vp"

    def __init__(self, cfg: DiffusionConfig, *, nonnegative: bool = True,
                 clip: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg, self.nonnegative, self.clip = cfg, nonnegative, clip
        self.sched = make_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)

    # -- the output form ---------------------------------------------------------------------------------------
    def predict_x0(self, network: nn.Module, x_t, x_self, ctrl, t, cov, uncond=None, ctrl_drop=None,
                   only=None) -> torch.Tensor:
        """x̂0 from the network's raw output: + the control mean (control skip), ReLU (non-negative space);
        ``only`` [B]: the sets that matter (Denoiser)."""
        ctrl = drop_controls(ctrl, ctrl_drop)
        out = network(x_t, x_self, ctrl, t, cov, uncond, **only_kwargs(network, only))  # (B, S, G)
        return output_form(out, ctrl, control_skip=self.cfg.control_skip, nonnegative=self.nonnegative)

    # -- training ----------------------------------------------------------------------------------------------
    def loss(self, network: nn.Module, batch: dict, generator: torch.Generator | None = None):
        """x0-prediction loss of one batch of sets: set losses of x̂0 against x0; returns (loss, parts)."""
        x0 = batch["target"].float()  # (B, S, G)
        b, dev, cfg = x0.shape[0], x0.device, self.cfg
        cov = {k: batch[k] for k in COV_KEYS if k in batch}
        t = draw("randint", (b,), generator, dev, high=self.sched.T)  # (B,)
        noise = draw("randn", tuple(x0.shape), generator, dev)  # (B, S, G)
        drops = Dropouts.draw(b, cfg, generator, dev)
        x_t = q_sample(self.sched, x0, t, noise)  # (B, S, G)
        ctrl = batch["control"]

        def predict(x_self, only=None):
            return self.predict_x0(network, x_t, x_self, ctrl, t, cov, drops.uncond, drops.ctrl_drop, only)

        x_self = self_conditioning(predict, x_t, drops.use_self, cfg.self_cond_prob > 0)
        x0_hat = predict(x_self).float()  # (B, S, G)
        return set_loss(x0_hat, x0, pad=batch.get("pad"), gene_mask=batch.get("gene_mask"),
                        ed_weight=cfg.ed_weight, mean_weight=cfg.mean_weight, mmd_weight=cfg.mmd_weight,
                        mean_w=batch.get("mean_w"))

    # -- sampling ----------------------------------------------------------------------------------------------
    def timesteps(self, settings: SampleConfig) -> list[int]:
        """Descending timesteps: "full" = ``steps`` respaced from T−1 to 0; "truncated" = start_t, …, 1, 0."""
        if settings.start == "full":
            return respace_timesteps(self.sched.T, settings.steps).tolist()
        if settings.start == "truncated":
            if settings.truncated_start_t >= self.sched.T:
                raise ValueError(f"truncated_start_t={settings.truncated_start_t} must be < T={self.sched.T}")
            return truncated_timesteps(settings.truncated_start_t).tolist()
        raise ValueError(f"unknown sampler start {settings.start!r}; choose 'full' or 'truncated'")

    def evaluations(self, settings: SampleConfig) -> int:
        """Network evaluations per sampled batch of sets (guidance doubles the batch, not the count)."""
        return len(self.timesteps(settings))

    @torch.no_grad()
    def sample(self, network: nn.Module, controls: torch.Tensor, covariates: dict, settings: SampleConfig,
               generator: torch.Generator | None = None, *, progress: bool = False) -> torch.Tensor:
        """DDIM, η = 0 (Song et al. 2021): x_{t'} = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·ε̂ from pure noise; returns the last x̂0.

        Self-conditioning feeds each branch its own previous x̂0. With guidance w ≠ 0 the conditional and
        unconditional branches run as one forward of a doubled batch and mix in ε; w = 0 is one conditional pass.
        A zero ``controls`` stream is the marginal (pretraining) case. The network is in eval mode for the call.
        """
        sched, w = self.sched, settings.guidance
        ts = self.timesteps(settings)
        b = controls.shape[0]
        x = draw("randn", tuple(controls.shape), generator, controls.device)  # (B, S, G)
        if w != 0.0:
            controls, covariates, uncond = doubled(controls, covariates)  # (2B, S, G)
        x_self = torch.zeros(controls.shape, device=x.device)  # (B|2B, S, G)
        feed = self.cfg.self_cond_prob > 0  # a network trained without self-conditioning only ever saw zeros there
        was_training = network.training
        network.eval()
        try:
            for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM", leave=False)):
                t_b = torch.full((b,), t, device=x.device, dtype=torch.long)  # (B,)
                if w != 0.0:
                    tt = torch.full((2 * b,), t, device=x.device, dtype=torch.long)
                    both = self.predict_x0(network, torch.cat([x, x]), x_self, controls, tt, covariates,
                                           uncond).float()  # (2B, S, G)
                    x_self = both if feed else x_self
                    x0_c, x0_u = both.chunk(2)
                    eps = guide(eps_from_x0(sched, x, t_b, x0_c), eps_from_x0(sched, x, t_b, x0_u), w)
                    x0 = x0_from_eps(sched, x, t_b, eps)
                    x0 = x0.clamp_min(0.0) if self.nonnegative else x0
                else:
                    x0 = self.predict_x0(network, x, x_self, controls, t_b, covariates).float()
                    x_self = x0 if feed else x_self
                if self.clip is not None:
                    x0 = self.clip(x0)
                eps = eps_from_x0(sched, x, t_b, x0)  # (B, S, G)
                abar_prev = float(sched.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
                x = abar_prev**0.5 * x0 + (1.0 - abar_prev) ** 0.5 * eps
        finally:
            network.train(was_training)
        return x0
