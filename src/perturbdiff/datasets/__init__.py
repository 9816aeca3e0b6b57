"""perturbdiff.datasets: the built-in synthetic simulator and loaders for real data sets."""

from perturbdiff.datasets._real import load_kang2018, read_h5ad
from perturbdiff.datasets._synthetic import simulate, simulate_atlas

__all__ = ["simulate", "simulate_atlas", "read_h5ad", "load_kang2018"]
