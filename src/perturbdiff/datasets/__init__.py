"""perturbdiff.datasets: the built-in synthetic simulator and loaders for real data sets."""

from perturbdiff.datasets._real import load_kang2018, read_h5ad
from perturbdiff.datasets._synthetic import simulate

__all__ = ["simulate", "read_h5ad", "load_kang2018"]
