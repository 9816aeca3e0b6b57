"""Flow matching over cell sets (``process = "flow"``; scDFM, CellFlow): the linear path x_t = t·x1 + (1 − t)·x0.

The source x0 is Gaussian noise (the control set conditions the network, as in scDFM) or the control cells
themselves (transport control → perturbed, as in CellFlow), paired with the target cells at random or by minibatch
optimal transport within each set. By default the network predicts the endpoint x̂1, in the same output form as VP
diffusion's x̂0 (control skip, ReLU in a non-negative codec), and the velocity is v̂ = (x̂1 − x_t) / (1 − t): the
set losses, self-conditioning and guidance carry over unchanged. With ``flow_target = "velocity"`` the network
predicts v̂ itself and x̂1 = x_t + (1 − t)·v̂.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

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
from perturbdiff.diffusion._losses import masked_mse, set_loss
from perturbdiff.diffusion._solvers import EVALUATIONS, SOLVERS

TIME_SCALE = 1000.0  # t in [0, 1] enters the timestep embedding as t · 1000, the range VP's integer steps use
MIN_REMAINING = 1e-3  # 1 − t is clamped here where the velocity divides by it


def ot_pairing(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` [B, S, G] reordered within each set so that cell i goes to target cell i along the minimal total
    squared distance (an exact assignment per set; scipy's Hungarian solver)."""
    out = torch.empty_like(source)
    cost = torch.cdist(source.float(), target.float()).pow(2).cpu().numpy()  # (B, S, S)
    for b in range(source.shape[0]):
        rows, cols = linear_sum_assignment(cost[b])
        order = np.empty(len(cols), np.int64)
        order[cols] = rows
        out[b] = source[b, torch.from_numpy(order).to(source.device)]
    return out


class FlowMatching:
    """The ``"flow"`` process; ``nonnegative`` and ``clip`` come from the codec, as for VP diffusion."""

    kind = "flow"

    def __init__(self, cfg: DiffusionConfig, *, nonnegative: bool = True,
                 clip: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg, self.nonnegative, self.clip = cfg, nonnegative, clip

    # -- the network's output --------------------------------------------------------------------------------
    def _raw(self, network: nn.Module, x_t, x_self, ctrl, t, cov, uncond, ctrl_drop, only=None):
        """The network's raw output [B, S, G] (fp32) and the control stream it saw; ``only``: see Denoiser."""
        ctrl = drop_controls(ctrl, ctrl_drop)
        return network(x_t, x_self, ctrl, t * TIME_SCALE, cov, uncond, **only_kwargs(network, only)).float(), ctrl

    def _form(self, out: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
        return output_form(out, ctrl, control_skip=self.cfg.control_skip, nonnegative=self.nonnegative)

    def predict(self, network: nn.Module, x_t, x_self, ctrl, t, cov, uncond=None, ctrl_drop=None):
        """(x̂1, v̂) at times t [B] in [0, 1]."""
        out, ctrl = self._raw(network, x_t, x_self, ctrl, t, cov, uncond, ctrl_drop)
        rest = (1.0 - t).clamp_min(MIN_REMAINING)[:, None, None]
        if self.cfg.flow_target == "velocity":
            return x_t + rest * out, out
        x1 = self._form(out, ctrl)
        return x1, (x1 - x_t) / rest

    def endpoint(self, network: nn.Module, x_t, x_self, ctrl, t, cov, uncond=None, ctrl_drop=None, only=None):
        """x̂1 alone, what the set losses and self-conditioning read: an endpoint network's velocity is not
        computed (two passes over the set fewer per forward). ``only`` [B]: the sets that matter (Denoiser)."""
        if self.cfg.flow_target == "velocity":
            return self.predict(network, x_t, x_self, ctrl, t, cov, uncond, ctrl_drop)[0]
        return self._form(*self._raw(network, x_t, x_self, ctrl, t, cov, uncond, ctrl_drop, only))

    def _source(self, batch: dict, x1: torch.Tensor, generator) -> torch.Tensor:
        if self.cfg.flow_source == "noise":
            return draw("randn", tuple(x1.shape), generator, x1.device)
        ctrl = batch["control"].float()
        if self.cfg.flow_pairing == "ot":
            return ot_pairing(ctrl, x1)
        keys = draw("rand", tuple(ctrl.shape[:2]), generator, ctrl.device)  # (B, S): a random order per set
        return torch.gather(ctrl, 1, keys.argsort(dim=1)[:, :, None].expand_as(ctrl))

    def _time(self, b: int, generator, device) -> torch.Tensor:
        if self.cfg.flow_time == "logit_normal":
            return torch.sigmoid(draw("randn", (b,), generator, device))
        return draw("rand", (b,), generator, device)

    # -- training --------------------------------------------------------------------------------------------
    def loss(self, network: nn.Module, batch: dict, generator: torch.Generator | None = None):
        """Set losses of x̂1 against the target set (the velocity's MSE instead with ``flow_target = "velocity"``)."""
        x1 = batch["target"].float()  # (B, S, G)
        b, dev, cfg = x1.shape[0], x1.device, self.cfg
        cov = {k: batch[k] for k in COV_KEYS if k in batch}
        t = self._time(b, generator, dev)  # (B,)
        x0 = self._source(batch, x1, generator)  # (B, S, G)
        drops = Dropouts.draw(b, cfg, generator, dev)
        x_t = torch.lerp(x0, x1, t[:, None, None])  # t·x1 + (1 − t)·x0 in one pass
        ctrl = batch["control"]

        def endpoint(x_self, only=None):
            return self.endpoint(network, x_t, x_self, ctrl, t, cov, drops.uncond, drops.ctrl_drop, only)

        x_self = self_conditioning(endpoint, x_t, drops.use_self, cfg.self_cond_prob > 0)
        mse = None
        if cfg.flow_target != "velocity":
            x1_hat = endpoint(x_self)
        else:
            x1_hat, v_hat = self.predict(network, x_t, x_self, ctrl, t, cov, drops.uncond, drops.ctrl_drop)
            pad = batch.get("pad")
            cell_w = x1.new_ones(x1.shape[:2]) if pad is None else (~pad.bool()).float()
            gene_w = batch.get("gene_mask")
            mse = masked_mse(v_hat, x1 - x0, cell_w, None if gene_w is None else gene_w.float())
        return set_loss(x1_hat, x1, pad=batch.get("pad"), gene_mask=batch.get("gene_mask"), ed_weight=cfg.ed_weight,
                        mean_weight=cfg.mean_weight, mmd_weight=cfg.mmd_weight, mse=mse, mean_w=batch.get("mean_w"))

    # -- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, network: nn.Module, controls: torch.Tensor, covariates: dict, settings: SampleConfig,
               generator: torch.Generator | None = None, *, progress: bool = False) -> torch.Tensor:
        """Integrate the velocity from the source at t = 0 to t = 1 with ``settings.solver`` in ``settings.steps``
        steps; returns the last x̂1. Guidance mixes the conditional and unconditional velocities (one doubled
        forward); self-conditioning feeds each branch its previous x̂1."""
        w = settings.guidance
        x = (draw("randn", tuple(controls.shape), generator, controls.device) if self.cfg.flow_source == "noise"
             else controls.float().clone())
        ctrl, cov, uncond = doubled(controls, covariates) if w != 0.0 else (controls, covariates, None)
        state = {"x_self": torch.zeros(ctrl.shape, device=x.device)}

        def field(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            n = ctrl.shape[0]
            tt = torch.full((n,), t, device=x.device)
            xin = torch.cat([x, x]) if w != 0.0 else x
            x1, v = self.predict(network, xin, state["x_self"], ctrl, tt, cov, uncond)
            if self.cfg.self_cond_prob > 0:  # a network trained without self-conditioning only ever saw zeros there
                state["x_self"] = x1
            if w != 0.0:
                v = guide(*v.chunk(2), w)
                x1 = x + (1.0 - t) * v
                x1 = x1.clamp_min(0.0) if self.nonnegative else x1
            if self.clip is not None:
                x1 = self.clip(x1)
            return (x1 - x) / max(1.0 - t, MIN_REMAINING), x1

        was_training = network.training
        network.eval()
        try:
            x1, _ = SOLVERS[settings.solver](field, x, settings.steps)
        finally:
            network.train(was_training)
        return x1

    def evaluations(self, settings: SampleConfig) -> int:
        """Network evaluations per sampled batch of sets (guidance doubles the batch, not the count)."""
        return EVALUATIONS.get(settings.solver, lambda n: -1)(settings.steps)  # -1: adaptive (dopri5)
