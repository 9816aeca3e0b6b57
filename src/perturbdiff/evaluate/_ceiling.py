"""cell-eval's data ceiling: how well any prediction could score, given the noise of the real cells alone.

Per context (each against its own controls, as the evaluation), cell-eval 0.8.2's ``compute_ceiling`` splits every
perturbation's cells and the controls into two disjoint halves, scores one half as the prediction of the other and
maps the half-depth mean to full depth with the Spearman–Brown correction r' = 2r / (1 + r). Only bounded
higher-is-better metrics get a ceiling (pearson_Δ, the discrimination scores, overlaps, precisions, …); error
metrics, counts and our R² are left undefined (NaN). Contexts are averaged weighted by their perturbations, like
the per-condition mean of the evaluation.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff.evaluate._metrics import quiet_scorer

CEILING = "data ceiling"  # the row name of the ceiling in a results table (never a contender)


def data_ceiling(real: AnnData, *, pert_col: str, control: str, context_col: str, num_threads: int = 2,
                 profile: str = "full", seed: int = 0) -> pd.Series:
    """The ceiling of every metric over the real test cells (``build_real``'s layout), mean over contexts."""
    from cell_eval import MetricsEvaluator

    values, weights = [], []
    with tempfile.TemporaryDirectory(prefix="perturbdiff-ceiling-") as work, quiet_scorer():
        for ctx in pd.unique(real.obs[context_col].astype(str)):
            r_ct = real[(real.obs[context_col].astype(str) == ctx).to_numpy()].copy()
            n_pert = r_ct.obs[pert_col].astype(str).loc[lambda p: p != control].nunique()
            if n_pert == 0:
                continue
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore", RuntimeWarning)
                evaluator = MetricsEvaluator(adata_pred=None, adata_real=r_ct, control_pert=control,
                                             pert_col=pert_col, num_threads=num_threads, outdir=work, prefix=None)
                _, agg = evaluator.compute_ceiling(profile=profile, write_csv=False, seed=seed)
            values.append(pd.Series(agg.to_pandas().iloc[0], dtype=float))
            weights.append(n_pert)
    if not values:
        return pd.Series(dtype=float, name=CEILING)
    frame = pd.DataFrame(values)
    w = np.asarray(weights, float)
    mean = frame.apply(lambda col: np.nan if col.isna().all() else np.average(col.fillna(0), weights=w * col.notna()))
    return mean.rename(CEILING)


def with_ceiling(table: pd.DataFrame, real: AnnData, **kw) -> pd.DataFrame:
    """``table`` (contender × metric) with the ceiling row appended (metrics the ceiling lacks: NaN)."""
    ceiling = data_ceiling(real, **kw)
    return pd.concat([table, ceiling.reindex(table.columns).to_frame().T])
