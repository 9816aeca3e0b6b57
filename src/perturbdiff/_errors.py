"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class PerturbDiffError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(PerturbDiffError, ValueError):
    """The AnnData does not fit what was declared (columns, values, genes, scale)."""


class ConfigError(PerturbDiffError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(PerturbDiffError):
    """A checkpoint is missing, incomplete or unsafe to load."""
