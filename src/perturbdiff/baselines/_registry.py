"""The baseline registry: every baseline by name (``perturbdiff baseline NAME``, ``evaluate --baselines``)."""

from __future__ import annotations

from perturbdiff._errors import ConfigError
from perturbdiff.baselines._baselines import (
    AdditiveBaseline,
    Baseline,
    ControlBaseline,
    LinearBaseline,
    MeanBaseline,
)
from perturbdiff.baselines._unseen import KNNBaseline, TrainingMeanBaseline

BASELINES: dict[str, type[Baseline]] = {
    "control": ControlBaseline,
    "mean": MeanBaseline,
    "additive": AdditiveBaseline,
    "linear": LinearBaseline,
    "train_mean": TrainingMeanBaseline,
    "knn": KNNBaseline,
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """Instantiate a registered baseline by name."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](**kwargs)
