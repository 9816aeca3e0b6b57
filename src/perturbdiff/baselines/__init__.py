"""Baselines to beat (SPEC §6): control, per-perturbation mean, additive shift, ridge regression; for perturbations
never seen: the mean over training perturbations and k nearest neighbours in an embedding table.

Each is a plain class: ``fit(adata_prep, split, keys)``, then
``predict(conditions, n_cells, seed) -> AnnData``.
"""

from perturbdiff.baselines._baselines import AdditiveBaseline, ControlBaseline, LinearBaseline, MeanBaseline
from perturbdiff.baselines._registry import BASELINES, make_baseline
from perturbdiff.baselines._unseen import KNNBaseline, TrainingMeanBaseline

__all__ = [
    "BASELINES",
    "AdditiveBaseline",
    "ControlBaseline",
    "KNNBaseline",
    "LinearBaseline",
    "TrainingMeanBaseline",
    "MeanBaseline",
    "make_baseline",
]
