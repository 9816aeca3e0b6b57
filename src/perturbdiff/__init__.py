"""PerturbDiff: diffusion over sets of cells to predict single-cell perturbation responses."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("perturbdiff")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from perturbdiff._errors import CheckpointError, ConfigError, DataError, PerturbDiffError
from perturbdiff.config import Config

__all__ = ["PerturbDiff", "Config", "PerturbDiffError", "DataError", "ConfigError", "CheckpointError", "__version__"]


def __getattr__(name: str):
    """Import the model (and torch) only when it is used, so light commands start fast."""
    if name == "PerturbDiff":
        from perturbdiff._model import PerturbDiff

        return PerturbDiff
    raise AttributeError(f"module 'perturbdiff' has no attribute {name!r}")
