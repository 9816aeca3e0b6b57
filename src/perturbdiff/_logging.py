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


def setup_cli_logging(verbose: bool = False) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[perturbdiff] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
