"""The package logger; the CLI sets it to INFO so fallbacks and progress reach the terminal."""

import logging
import sys

logger = logging.getLogger("perturbdiff")
logger.addHandler(logging.NullHandler())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be swapped, e.g. by test capture)."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_CLI = {"active": False}


def is_cli() -> bool:
    """Whether a ``perturbdiff`` command is running (messages then name its flags)."""
    return _CLI["active"]


def warn(message: str, stacklevel: int = 3) -> None:
    """One warning, shown once: a log line under the command line, a ``UserWarning`` from Python."""
    if _CLI["active"]:
        logger.warning(message)
    else:
        import warnings

        warnings.warn(message, stacklevel=stacklevel)


def setup_cli_logging(verbose: bool = False) -> None:
    _CLI["active"] = True
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[perturbdiff] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def end_cli_logging() -> None:
    """After a command: warnings are Python warnings again (a second call in one process, e.g. tests)."""
    _CLI["active"] = False
