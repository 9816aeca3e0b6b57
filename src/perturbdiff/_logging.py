"""The package logger; the CLI sets it to INFO so fallbacks and progress reach the terminal."""

import logging

logger = logging.getLogger("perturbdiff")
logger.addHandler(logging.NullHandler())


def setup_cli_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[perturbdiff] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
