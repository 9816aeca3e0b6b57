"""Evaluation (SPEC §6): the cell-eval layout, cell-eval metrics + R², and an HTML report.

``build_real(adata_prep, split)`` gives the real side; ``evaluate(pred, real, ...)`` scores one prediction;
``evaluate_predictions({name: pred}, real, ...)`` scores several (model and baselines);
``write_report`` draws the figures and the HTML page.
"""

from perturbdiff.evaluate._layout import build_real, context_column, make_pair
from perturbdiff.evaluate._metrics import (
    HEADLINE,
    aggregate_metrics,
    evaluate,
    evaluate_predictions,
    format_table,
    pseudobulk_r2,
)
from perturbdiff.evaluate._report import write_report

__all__ = [
    "HEADLINE",
    "aggregate_metrics",
    "build_real",
    "context_column",
    "evaluate",
    "evaluate_predictions",
    "format_table",
    "make_pair",
    "pseudobulk_r2",
    "write_report",
]
