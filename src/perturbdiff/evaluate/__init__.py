"""Evaluation (SPEC §6): the cell-eval layout, cell-eval metrics + R², an HTML report, and response summaries.

``build_real(adata_prep, split)`` gives the real side; ``evaluate(pred, real, ...)`` scores one prediction;
``evaluate_predictions({name: pred}, real, ...)`` scores several (model and baselines);
``write_report`` draws the figures and the HTML page. ``METRICS`` / ``metric(name)`` describe every metric.
``log2_fold_changes``, ``pseudobulk_of`` and ``collapse_diagnostic`` summarise a prediction of responses.
``verdict_table`` / ``verdict_lines`` say per metric and baseline whether a model wins, ties or loses.
``data_ceiling`` / ``with_ceiling``: cell-eval's ceiling of every metric from the real cells alone.
``debias_responses`` / ``ppi_mean``: prediction-powered estimates with intervals; ``score_cell_eval2``: the optional
second scorer (cell-eval2, ``perturbdiff[eval2]``).
"""

from perturbdiff.evaluate._ceiling import CEILING, data_ceiling, with_ceiling
from perturbdiff.evaluate._cell_eval2 import check_cell_eval2, format_summary, score_cell_eval2, summary_table
from perturbdiff.evaluate._debias import MIN_RELATED, Debiased, PPIMean, debias_responses, ppi_mean, tune_lambda
from perturbdiff.evaluate._layout import build_real, context_column, make_pair
from perturbdiff.evaluate._metrics import (
    aggregate_metrics,
    evaluate,
    evaluate_predictions,
    format_table,
    pseudobulk_r2,
)
from perturbdiff.evaluate._registry import METRICS, Metric, headline, lower_is_better, metric
from perturbdiff.evaluate._report import write_report
from perturbdiff.evaluate._response import collapse_diagnostic, log2_fold_changes, pseudobulk_of
from perturbdiff.evaluate._verdict import verdict, verdict_lines, verdict_table

__all__ = [
    "CEILING",
    "METRICS",
    "MIN_RELATED",
    "Debiased",
    "Metric",
    "PPIMean",
    "aggregate_metrics",
    "build_real",
    "check_cell_eval2",
    "collapse_diagnostic",
    "context_column",
    "data_ceiling",
    "debias_responses",
    "evaluate",
    "evaluate_predictions",
    "format_summary",
    "format_table",
    "headline",
    "log2_fold_changes",
    "lower_is_better",
    "make_pair",
    "metric",
    "ppi_mean",
    "pseudobulk_of",
    "pseudobulk_r2",
    "score_cell_eval2",
    "summary_table",
    "tune_lambda",
    "verdict",
    "verdict_lines",
    "verdict_table",
    "with_ceiling",
    "write_report",
]
