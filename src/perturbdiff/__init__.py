"""PerturbDiff: diffusion over sets of cells to predict single-cell perturbation responses."""

from perturbdiff._errors import CheckpointError, ConfigError, DataError, OutputError, PerturbDiffError
from perturbdiff._version import __version__
from perturbdiff.config import Config

__all__ = [
    "PerturbDiff", "Config", "log2_fold_changes", "collapse_diagnostic", "pseudobulk_of",
    "PerturbDiffError", "DataError", "ConfigError", "CheckpointError", "OutputError", "__version__",
]


def __getattr__(name: str):
    """Import the model (and torch) only when it is used, so light commands start fast."""
    if name == "PerturbDiff":
        from perturbdiff._model import PerturbDiff

        return PerturbDiff
    if name in ("log2_fold_changes", "collapse_diagnostic", "pseudobulk_of"):
        from perturbdiff import _apply

        return getattr(_apply, name)
    raise AttributeError(f"module 'perturbdiff' has no attribute {name!r}")
