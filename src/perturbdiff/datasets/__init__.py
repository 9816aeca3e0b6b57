"""perturbdiff.datasets: the built-in synthetic simulator and loaders for real data sets (imported on first use)."""

from importlib import import_module

_WHERE = {"simulate": "_synthetic", "simulate_atlas": "_synthetic", "read_h5ad": "_real", "load_kang2018": "_real"}

__all__ = ["simulate", "simulate_atlas", "read_h5ad", "load_kang2018"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'perturbdiff.datasets' has no attribute {name!r}")
    value = getattr(import_module(f"perturbdiff.datasets.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
