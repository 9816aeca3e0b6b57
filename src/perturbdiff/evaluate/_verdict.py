"""The verdict of a comparison, in words: per metric and baseline, does the model win, tie or lose?

A difference counts only when it is larger than the conditions' own disagreement: per condition c, d_c = model −
baseline (sign flipped for metrics where lower is better); with n ≥ 3 conditions the model wins when the paired
``level`` interval of the mean of d (t on n − 1 degrees of freedom) lies above 0, loses when it lies below, and ties
otherwise. With fewer conditions there is no spread to judge by, so a relative difference within ``TIE_REL`` of the
baseline's value is a tie. (Between-condition spread is usually larger than between-seed spread, so this errs
towards "tie".)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from perturbdiff.evaluate._metrics import KEY_COLS
from perturbdiff.evaluate._registry import headline, is_score, label, lower_is_better

WIN, TIE, LOSS, NONE = "win", "tie", "loss", "—"
TIE_REL = 0.02  # fewer than 3 conditions: |difference| within 2 % of the baseline's value is a tie
MIN_PAIRED = 3


def verdict(model: Sequence[float], baseline: Sequence[float], *, lower_better: bool, level: float = 0.9) -> str:
    """``win`` / ``tie`` / ``loss`` of per-condition values ``model`` against ``baseline`` (paired by position);
    ``—`` when no condition has both."""
    m, b = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    ok = np.isfinite(m) & np.isfinite(b)
    m, b = m[ok], b[ok]
    if not len(m):
        return NONE
    d = (b - m) if lower_better else (m - b)
    if len(d) < MIN_PAIRED:
        gap = float(d.mean())
        return TIE if abs(gap) <= TIE_REL * max(abs(float(b.mean())), 1e-12) else (WIN if gap > 0 else LOSS)
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    mean = float(d.mean())
    if mean > half:
        return WIN
    return LOSS if mean < -half else TIE


def verdict_table(per_condition: dict[str, pd.DataFrame], model: str, baselines: Sequence[str],
                  metrics: Sequence[str] | None = None, *, level: float = 0.9) -> pd.DataFrame:
    """Metric × baseline table of verdicts of ``model``, from the per-condition tables of ``evaluate_predictions``
    (conditions paired by context and perturbation), over ``metrics`` (default: the summary's); counts (no best
    value) are left out."""
    metrics = headline() if metrics is None else metrics
    mine = per_condition[model].set_index(KEY_COLS)
    rows = {}
    for name in metrics:
        if name not in mine.columns or not is_score(name):
            continue
        row = {}
        for base in baselines:
            other = per_condition.get(base)
            if other is None or name not in other.columns:
                row[base] = NONE
                continue
            pair = mine[[name]].join(other.set_index(KEY_COLS)[[name]], rsuffix="_b", how="inner")
            row[base] = verdict(pd.to_numeric(pair[name], errors="coerce"),
                                pd.to_numeric(pair[f"{name}_b"], errors="coerce"),
                                lower_better=lower_is_better(name), level=level)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(baselines))


def verdict_lines(table: pd.DataFrame, model: str) -> list[str]:
    """One plain sentence per baseline: how many metrics the model wins, ties and loses, naming the losses."""
    lines = []
    for base in table.columns:
        col = table[base]
        named = {v: [label(m) for m in col.index[col == v]] for v in (WIN, TIE, LOSS)}
        n = {v: len(named[v]) for v in named}
        if not sum(n.values()):
            continue
        text = f"{model} against {base}: {n[WIN]} won, {n[TIE]} tied, {n[LOSS]} lost"
        if named[LOSS]:
            text += f" (lost: {', '.join(named[LOSS])})"
        lines.append(text)
    return lines
