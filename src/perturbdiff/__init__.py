"""PerturbDiff: diffusion over sets of cells to predict single-cell perturbation responses.

The public API. Nothing inside the package imports this module; the model objects (and torch) are imported only
when first used, so light commands start fast.
"""

from perturbdiff._errors import CheckpointError, ConfigError, DataError, OutputError, PerturbDiffError
from perturbdiff._lazy import lazy_names
from perturbdiff._version import __version__
from perturbdiff.config import Config

_WHERE = {
    "PerturbDiff": "model", "Pretrained": "model", "finetune": "model", "load_run": "model",
    "log2_fold_changes": "evaluate", "collapse_diagnostic": "evaluate", "pseudobulk_of": "evaluate",
    "set_threads": "_threads",
}

__all__ = [*_WHERE, "Config", "PerturbDiffError", "DataError", "ConfigError", "CheckpointError", "OutputError",
           "__version__"]

__getattr__ = lazy_names("perturbdiff", _WHERE, globals())
