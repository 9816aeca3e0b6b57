"""The conditioning policy any process shares: label and control dropout, self-conditioning, guidance (SPEC §3).

Training drops the covariates of a share of sets (``p_uncond``: classifier-free guidance learns an unconditional
branch), the control stream of a share (``p_drop_control``; 1.0 in marginal pretraining) and feeds a first no-grad
prediction back to a share (``self_cond_prob``). Sampling runs the conditional and unconditional branches as one
forward of a doubled batch and mixes them with weight w.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: covariate names a network reads; "dataset" only in marginal pretraining
COV_KEYS = ("pert", "context", "batch", "dose", "dataset")


def draw(kind: str, shape: tuple, generator: torch.Generator | None, device: torch.device, high: int = 0):
    """Random draw on the generator's device (so a CPU generator works for CUDA data), moved to ``device``."""
    kw = {"generator": generator, "device": generator.device if generator is not None else device}
    if kind == "randint":
        return torch.randint(high, shape, **kw).to(device)
    return (torch.randn if kind == "randn" else torch.rand)(shape, **kw).to(device)


@dataclass
class Dropouts:
    """Per-set training draws [B] (bool): unconditional, control stream zeroed (None where no set can be: then no
    copy of the control stream is made), self-conditioned."""

    uncond: torch.Tensor
    ctrl_drop: torch.Tensor | None
    use_self: torch.Tensor

    @classmethod
    def draw(cls, b: int, cfg, generator: torch.Generator | None, device: torch.device) -> Dropouts:
        """Three uniform draws per set, in this order, against ``cfg.p_uncond / p_drop_control / self_cond_prob``
        (all three are drawn whatever the shares, so the random streams do not depend on them)."""
        uncond = draw("rand", (b,), generator, device) < cfg.p_uncond
        ctrl_drop = draw("rand", (b,), generator, device) < cfg.p_drop_control
        use_self = draw("rand", (b,), generator, device) < cfg.self_cond_prob
        return cls(uncond, ctrl_drop if cfg.p_drop_control > 0 else None, use_self)


def drop_controls(ctrl: torch.Tensor, ctrl_drop: torch.Tensor | None) -> torch.Tensor:
    """The control stream with the chosen sets' cells all zero."""
    return ctrl if ctrl_drop is None else ctrl.masked_fill(ctrl_drop.reshape(-1, 1, 1), 0.0)  # (B, S, G)


def output_form(out: torch.Tensor, ctrl: torch.Tensor, *, control_skip: bool, nonnegative: bool) -> torch.Tensor:
    """A network's raw output as a prediction of the data: + the control set's mean profile (``control_skip``: predict
    a residual), ReLU in a non-negative model space."""
    if control_skip:
        out = out + ctrl.mean(dim=1, keepdim=True).to(out.dtype)
    return F.relu(out) if nonnegative else out


def self_conditioning(predict: Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor],
                      like: torch.Tensor, use_self: torch.Tensor, enabled: bool) -> torch.Tensor:
    """The self-conditioning input: a no-grad first prediction where ``use_self``, zeros elsewhere.

    ``predict(x_self, only)`` is called with x_self None (zeros) and only = ``use_self``: the network computes the
    chosen sets alone (about half the batch at self_cond_prob 0.5). It runs on a fork of the global generators and
    forms the conditioning of the whole batch, so label dropout inside the network draws the same labels in the
    graded second pass.
    """
    x_self = torch.zeros_like(like)
    if not enabled:
        return x_self
    dev = like.device
    forked = [dev] if dev.type != "cpu" else []
    with torch.no_grad(), torch.random.fork_rng(devices=forked, device_type=dev.type):
        first = predict(None, use_self).float()  # (B, S, G); None: the network's x̂0_self input is zero
    return torch.where(use_self[:, None, None], first, x_self)


def only_kwargs(network: Callable, only: torch.Tensor | None) -> dict:
    """``{"only": only}`` where the network takes that argument (the package's Denoiser, or a wrapper that passes
    keyword arguments on), else nothing: another network then computes every set, as before."""
    return {} if only is None or not _takes_only(type(network)) else {"only": only}


@functools.cache
def _takes_only(kind: type) -> bool:
    """Whether a network class's forward (or call) takes ``only``: read once per class, not once per step."""
    params = inspect.signature(getattr(kind, "forward", kind.__call__)).parameters
    return "only" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def doubled(ctrl: torch.Tensor, cov: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Control stream and covariates twice over, and the mask of the second (unconditional) half [2B]."""
    b = ctrl.shape[0]
    uncond = torch.arange(2 * b, device=ctrl.device) >= b
    return torch.cat([ctrl, ctrl]), {k: torch.cat([v, v]) for k, v in cov.items()}, uncond


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + w)·cond − w·uncond (in whatever space the process mixes: ε, velocity)."""
    return (1 + w) * cond - w * uncond
