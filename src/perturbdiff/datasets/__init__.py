"""perturbdiff.datasets: the built-in synthetic simulator and loaders for real data sets (imported on first use)."""

from perturbdiff._lazy import lazy_names

_WHERE = {"simulate": "_synthetic", "simulate_atlas": "_synthetic", "read_h5ad": "_real", "load_kang2018": "_real"}

__all__ = ["simulate", "simulate_atlas", "read_h5ad", "load_kang2018"]


__getattr__ = lazy_names("perturbdiff.datasets", _WHERE, globals())
