"""Every metric in one place: what it measures, which way is better, where the report shows it.

``METRICS`` maps a metric name (cell-eval's names, plus ``r2`` and the training validator's in-process scores) to
its ``Metric`` record. The evaluation, the report and the command line read their metric lists from here; the
validator calls ``metric("pearson_delta").compute``. A name not registered (a future cell-eval column) counts as a
score where higher is better, shown under its own name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

KINDS = ("expression", "de", "distribution")
BEST = ("higher", "lower", None)


@dataclass(frozen=True)
class Metric:
    """One metric: ``best`` is "higher", "lower" or None (a count, no best value); ``kind`` what it compares."""

    name: str
    kind: str
    best: str | None
    description: str
    label: str | None = None  # short column title in printed tables and the report (default: the name)
    headline: int | None = None  # position in the summary table (None: only under "all metrics")
    scatter: int | None = None  # position in the report's per-condition model-vs-baseline figure
    cell_eval: bool = True  # computed by cell-eval (else by perturbdiff itself)
    compute: Callable[..., float] | None = None  # fast in-process version, where there is one

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.best not in BEST:
            raise ValueError(f"metric {self.name!r}: kind must be one of {KINDS}, best one of {BEST}")


def pearson_delta(pred_mean: np.ndarray, real_mean: np.ndarray, control_mean: np.ndarray) -> float:
    """Pearson r over genes of the predicted and real mean shifts from the control mean (NaN when one is constant)."""
    a, b = pred_mean - control_mean, real_mean - control_mean
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _metrics(*records: Metric) -> dict[str, Metric]:
    return {m.name: m for m in records}


_E, _DE, _D = "expression", "de", "distribution"

METRICS: dict[str, Metric] = _metrics(
    # -- the summary table, in its order ---------------------------------------------------------------------
    Metric("overlap_at_N", _DE, "higher", "overlap of the top-N DE genes (N = real DE genes)", headline=0, scatter=3),
    Metric("precision_at_N", _DE, "higher", "precision of the predicted top-N DE genes", headline=1),
    Metric("de_direction_match", _DE, "higher", "agreement in direction of the DE genes' changes", label="dir",
           headline=2),
    Metric("de_spearman_lfc_sig", _DE, "higher", "Spearman r of log fold changes of the significant genes",
           label="lfc_rho", headline=3),
    Metric("pr_auc", _DE, "higher", "precision-recall AUC of recovering the significant genes", headline=4,
           scatter=2),
    Metric("roc_auc", _DE, "higher", "ROC AUC of recovering the significant genes", headline=5),
    Metric("pearson_delta", _E, "higher", "Pearson r of predicted vs real mean shift from the control mean",
           label="pearson_Δ", headline=6, scatter=0, compute=pearson_delta),
    Metric("mse", _E, "lower", "mean squared error of the pseudobulks", headline=7, scatter=4),
    Metric("mae", _E, "lower", "mean absolute error of the pseudobulks", headline=8),
    Metric("discrimination_score_l1", _E, "higher", "normalised rank of the real pseudobulk among all, by L1",
           label="pds_l1", headline=9, scatter=5),
    Metric("discrimination_score_l2", _E, "higher", "normalised rank of the real pseudobulk among all, by L2",
           label="pds_l2", headline=10),
    Metric("discrimination_score_cosine", _E, "higher", "normalised rank of the real pseudobulk among all, by cosine",
           label="pds_cosine", headline=11),
    Metric("r2", _E, "higher", "R² of the real pseudobulk by the predicted one, over genes", headline=12, scatter=1,
           cell_eval=False),
    Metric("r2_delta", _E, "higher", "R² of the real shift from the control pseudobulk by the predicted shift, over "
           "genes (the response only: the control cells alone score 0)", label="r2_Δ", headline=13,
           cell_eval=False),
    # -- the rest of cell-eval's full profile ----------------------------------------------------------------
    Metric("mse_delta", _E, "lower", "mean squared error of the shifts from control"),
    Metric("mae_delta", _E, "lower", "mean absolute error of the shifts from control"),
    Metric("pearson_edistance", _D, "higher", "Pearson r of predicted vs real energy distances from control"),
    Metric("clustering_agreement", _E, "higher", "agreement of clusterings of real and predicted centroids"),
    *(Metric(f"overlap_at_{n}", _DE, "higher", f"overlap of the top {n} DE genes") for n in (50, 100, 200, 500)),
    *(Metric(f"precision_at_{n}", _DE, "higher", f"precision of the top {n} DE genes") for n in (50, 100, 200, 500)),
    Metric("de_spearman_sig", _DE, "higher", "Spearman r of the numbers of significant genes across perturbations"),
    Metric("de_sig_genes_recall", _DE, "higher", "recall of the significant genes"),
    Metric("de_nsig_counts_real", _DE, None, "number of significant genes, real cells"),
    Metric("de_nsig_counts_pred", _DE, None, "number of significant genes, predicted cells"),
    # -- the training validator's in-process score (val_ed) --------------------------------------------------
    Metric("energy_distance", _D, "lower", "energy distance between predicted and real cells (validation: val_ed)",
           cell_eval=False),
)


def metric(name: str) -> Metric:
    """The record of ``name`` (KeyError naming the known metrics when there is none)."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"no metric {name!r}; known: {', '.join(METRICS)}") from None


def lower_is_better(name: str) -> bool:
    return name in METRICS and METRICS[name].best == "lower"


def is_score(name: str) -> bool:
    """False for counts (no best value); an unregistered name counts as a score."""
    return name not in METRICS or METRICS[name].best is not None


def label(name: str) -> str:
    """Short column title of ``name`` (the name itself when it has none or is not registered)."""
    m = METRICS.get(name)
    return m.label if m is not None and m.label else name


def _ordered(field: str) -> list[str]:
    ranked = [(getattr(m, field), m.name) for m in METRICS.values() if getattr(m, field) is not None]
    return [name for _, name in sorted(ranked)]


def headline() -> list[str]:
    """The columns of the short table (printed by the CLI, the report's summary), in order."""
    return _ordered("headline")


def scatter_metrics() -> list[str]:
    """The metrics of the report's per-condition model-vs-best-baseline figure, in order."""
    return _ordered("scatter")

