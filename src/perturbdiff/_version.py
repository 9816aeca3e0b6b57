"""The installed package's version, readable by every module without importing perturbdiff's ``__init__``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("perturbdiff")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
