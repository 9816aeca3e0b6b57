"""How config values are read, checked and written: strict coercion, the range and choice rules, TOML values."""

from __future__ import annotations

import math
from typing import Any

from perturbdiff._errors import ConfigError

SAMPLER_STARTS = ("full", "truncated")
PROCESS_KINDS = ("vp", "flow")  # perturbdiff.diffusion.PROCESSES
FLOW_CHOICES = {"flow_source": ("noise", "control"), "flow_pairing": ("random", "ot"),
                "flow_time": ("uniform", "logit_normal"), "flow_target": ("endpoint", "velocity")}
SOLVERS = ("euler", "heun", "dopri5", "rk4")
CODEC_KINDS = ("scale", "latent")  # perturbdiff.data.CODECS
PRECISIONS = ("auto", "bf16", "fp32")
VAL_SELECT = ("ed", "ed_pearson")  # perturbdiff.train._loop.selection_score
ZERO_MODES = ("sample", "mean", "threshold")  # perturbdiff.data._latent.ZERO_MODES
PRIOR_ROUTES = ("coexpression", "knowledge", "effects")  # model.pert_prior; perturbdiff.data._priors reads it
# model.anchor (or ""): the baselines a model may start from; knn_mean is knn where a part no route places takes the
# mean shift over the context's trained singles instead of no effect
ANCHORS = ("additive", "knn", "knn_mean", "train_mean", "linear")
AUTO_ANCHORS = ("knn", "train_mean", "linear")  # what model.anchor = "auto" chooses among (knn: additive + neighbours)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(dotted: str, current: Any, value: Any) -> Any:
    """``value`` as the type of the key's default: strict booleans and numbers, one clear error otherwise."""
    try:
        if isinstance(current, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(current):
                raise ValueError
            return tuple(coerce(dotted, c, v) for c, v in zip(current, value))
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE and not isinstance(value, float):
                return text in _TRUE
            raise ValueError
        if isinstance(current, int):
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if not math.isfinite(f) or f != int(f):
                raise ValueError
            return int(f)
        if isinstance(current, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(current, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                tuple: f"a list of {len(current) if isinstance(current, tuple) else ''} numbers"}[type(current)]
        raise ConfigError(f"config key {dotted!r} needs {kind}, got {value!r}") from None
    return value


def flat_dict(d: dict, prefix: str = "") -> dict:
    """A nested dict as ``{"section.key": value}`` (tuples as lists, so a config compares with its JSON)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _unit(v) -> bool:
    return 0.0 <= v <= 1.0


def _pos(v) -> bool:
    return v > 0


def _nonneg(v) -> bool:
    return v >= 0


def _guidance(v) -> bool:
    """(1 + w)·cond − w·uncond: w < 0 leans towards the unconditional branch, -1 is that branch alone; below -1
    the prediction would be pushed away from its own condition."""
    return math.isfinite(v) and v >= -1


def guidance_weights(spec) -> list[float]:
    """``train.val_guidance`` ("0,-0.25,-0.5") as weights, in order; "" = none (ValueError on a non-number)."""
    return [float(w) for w in str(spec).split(",") if w.strip()]


def _guidance_list(v) -> bool:
    try:
        return all(_guidance(w) for w in guidance_weights(v))
    except ValueError:
        return False


#: key -> (check, what it needs); Config.validate applies them to the resolved config
RULES: dict[str, tuple[Any, str]] = {
    "data.set_size": (_pos, "at least 1"), "data.batch_sets": (_pos, "at least 1"),
    "data.control_set_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"), "data.num_workers": (_nonneg, ">= 0"),
    "data.fraction": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "model.hidden": (_pos, "at least 1"), "model.depth": (_pos, "at least 1"), "model.heads": (_pos, "at least 1"),
    "model.mlp_ratio": (_pos, "> 0"), "model.cov_dim": (_pos, "at least 1"),
    "model.context_dropout": (_unit, "in [0, 1]"), "model.batch_dropout": (_unit, "in [0, 1]"),
    "model.pert_dropout": (_unit, "in [0, 1]"),
    "model.pert_dropout_combo": (lambda v: v == -1 or 0 <= v <= 1, "in [0, 1], or -1 for pert_dropout"),
    "model.prior_dropout": (_unit, "in [0, 1]"),
    "model.prior_dim": (_pos, "at least 1"), "model.prior_neighbours": (_pos, "at least 1"),
    "model.pert_prior": (lambda v: all(r.strip() in PRIOR_ROUTES for r in v.split(",") if r.strip()),
                         f"comma-separated routes from {', '.join(PRIOR_ROUTES)}"),
    "model.anchor": (lambda v: v in ("", "auto", *ANCHORS), f"'', auto or one of {', '.join(ANCHORS)}"),
    "diffusion.timesteps": (lambda v: v >= 2, "at least 2"), "diffusion.beta_start": (lambda v: 0 < v < 1, "in (0, 1)"),
    "diffusion.beta_end": (lambda v: 0 < v < 1, "in (0, 1)"), "diffusion.ed_weight": (_nonneg, ">= 0"),
    "diffusion.mean_weight": (_nonneg, ">= 0"), "diffusion.mean_de_weight": (_nonneg, ">= 0"),
    "diffusion.mean_de_cap": (_nonneg, ">= 0 (0: no cap)"),
    "diffusion.self_cond_prob": (_unit, "in [0, 1]"),
    "diffusion.p_uncond": (_unit, "in [0, 1]"), "diffusion.p_drop_control": (_unit, "in [0, 1]"),
    "diffusion.process": (lambda v: v in PROCESS_KINDS, f"one of {', '.join(PROCESS_KINDS)}"),
    "diffusion.mmd_weight": (_nonneg, ">= 0"),
    **{f"diffusion.{k}": (lambda v, c=c: v in c, f"one of {', '.join(c)}") for k, c in FLOW_CHOICES.items()},
    "sample.solver": (lambda v: v in SOLVERS, f"one of {', '.join(SOLVERS)}"),
    "sample.steps": (_pos, "at least 1"),
    "sample.start": (lambda v: v in SAMPLER_STARTS, f"one of {', '.join(SAMPLER_STARTS)}"),
    "sample.truncated_start_t": (_nonneg, ">= 0"),
    "sample.guidance": (_guidance, ">= -1: -1 samples the unconditional branch alone, 0 the conditional alone"),
    "codec.kind": (lambda v: v in CODEC_KINDS, f"one of {', '.join(CODEC_KINDS)}"),
    "codec.zero_threshold": (_nonneg, ">= 0"),
    "codec.latent_dim": (_pos, "at least 1"), "codec.latent_hidden": (_pos, "at least 1"),
    "codec.latent_depth": (_pos, "at least 1"), "codec.latent_steps": (lambda v: v >= 10, "at least 10"),
    "codec.latent_batch": (_pos, "at least 1"), "codec.latent_lr": (_pos, "> 0"),
    "codec.zeros": (lambda v: v in ZERO_MODES, f"one of {', '.join(ZERO_MODES)}"),
    "train.lr": (_pos, "> 0"), "train.betas": (lambda v: all(0.0 <= b < 1.0 for b in v), "each in [0, 1)"),
    "train.eps": (_pos, "> 0"), "train.weight_decay": (_nonneg, ">= 0"), "train.warmup_steps": (_nonneg, ">= 0"),
    "train.plateau_fraction": (_unit, "in [0, 1]"), "train.min_lr_ratio": (_unit, "in [0, 1]"),
    "train.grad_clip": (_pos, "> 0"), "train.max_steps": (_pos, "at least 1"), "train.val_every": (_pos, "at least 1"),
    "train.val_max_conditions": (_pos, "at least 1"),
    "train.val_cells": (_nonneg, ">= 0 (0: the first 2 × data.set_size)"),
    "train.val_select": (lambda v: v in VAL_SELECT, f"one of {', '.join(VAL_SELECT)}"),
    "train.val_guidance": (_guidance_list, "comma-separated guidance weights, each >= -1 (e.g. '0,-0.25,-0.5'), or ''"),
    "train.ema_decay": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train.ema_every": (_pos, "at least 1"), "train.log_every": (_pos, "at least 1"),
    "train.precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "train.grad_accum": (_pos, "at least 1"),
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
