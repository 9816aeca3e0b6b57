"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class PerturbDiffError(Exception):
    """Base class of errors caused by the user's input, not by a bug.

    ``python`` / ``cli``: the remedy in the words of each interface (``missing_genes='zero'`` vs
    ``--missing-genes zero``); ``str(e)`` carries the Python one, the command line prints :meth:`for_cli`.
    """

    def __init__(self, message: str = "", *, python: str | None = None, cli: str | None = None):
        super().__init__(message)
        self.message, self.python, self.cli = message, python, cli

    def __str__(self) -> str:
        return self.message + (f"; {self.python}" if self.python else "")

    def for_cli(self) -> str:
        hint = self.cli or self.python
        return self.message + (f"; {hint}" if hint else "")


class DataError(PerturbDiffError, ValueError):
    """The AnnData does not fit what was declared (columns, values, genes, scale)."""


class ConfigError(PerturbDiffError, ValueError):
    """A configuration value or file is invalid."""


class CheckpointError(PerturbDiffError):
    """A checkpoint is missing, incomplete or unsafe to load."""


class OutputError(PerturbDiffError):
    """An output cannot be written (read-only folder, full disk): found before the work starts."""
