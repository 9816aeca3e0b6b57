"""Baselines to beat (SPEC §6): control, per-perturbation mean, additive shift, ridge regression.

Each is a plain class: ``fit(adata_prep, split, keys)``, then
``predict(conditions, n_cells, seed) -> AnnData``.
"""

from perturbdiff.baselines._baselines import (
    BASELINES,
    AdditiveBaseline,
    ControlBaseline,
    LinearBaseline,
    MeanBaseline,
    make_baseline,
)

__all__ = [
    "BASELINES",
    "AdditiveBaseline",
    "ControlBaseline",
    "LinearBaseline",
    "MeanBaseline",
    "make_baseline",
]
