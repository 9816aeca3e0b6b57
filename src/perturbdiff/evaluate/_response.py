"""Summaries of a predicted response (cells from ``predict_for_controls`` or a run's prediction): log2 fold changes,
pseudobulks, and the collapse diagnostic (responses of different perturbations nearly identical).

A prediction holds obs ``sample`` and ``predicted`` (False: the control cells it was generated from) next to its key
columns, which come from uns ``perturbdiff`` (``apply``: predict_for_controls' layout, else the run's ``record``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._logging import is_cli, logger, warn
from perturbdiff.data import DataKeys, get_record, group_means

COLLAPSE_R = 0.95  # pairwise Pearson r of predicted mean shifts above which responses count as collapsed
LFC_EPS = 0.01  # pseudocount of log2 fold changes, in normalised expression units (expm1 of log1p)


# -- reading a prediction -------------------------------------------------------------------------------------
def _layout(pred: AnnData) -> dict[str, Any]:
    """Column roles of a prediction: from predict_for_controls' uns entry, else from the run's record keys."""
    entry = pred.uns.get("perturbdiff", {})
    if "apply" in entry:
        return json.loads(entry["apply"])
    keys = DataKeys.from_dict(get_record(pred)["keys"])
    return {"context_keys": list(keys.context_keys), "pert_key": keys.pert_key, "control": keys.control_value,
            "dose_key": keys.dose_key, "pseudobulk": "n_cells" in pred.obs}


def _factorize(obs: pd.DataFrame, cols: Sequence[str]) -> tuple[np.ndarray, list[tuple]]:
    """Group code per row [N] and each group's values (first-appearance order)."""
    codes, uniq = pd.MultiIndex.from_frame(obs[list(cols)].astype(str)).factorize()
    return np.asarray(codes, np.int64), list(uniq)


def _pred_and_controls(pred: AnnData, lay: dict, *, expm1: bool = False):
    """Mean of predicted cells per (context, label) and of controls per context, and the group keys."""
    ctx_cols = list(lay["context_keys"])
    label_cols = [lay["pert_key"], *([lay["dose_key"]] if lay.get("dose_key") else [])]
    is_pred = pred.obs["predicted"].to_numpy(bool)
    w = pred.obs["n_cells"].to_numpy(float) if "n_cells" in pred.obs else None
    pc, pkeys = _factorize(pred.obs[is_pred], ctx_cols + label_cols)
    cc, ckeys = _factorize(pred.obs[~is_pred], ctx_cols)
    pm = group_means(pred.X[is_pred], pc, len(pkeys), None if w is None else w[is_pred], expm1=expm1)
    cm = group_means(pred.X[~is_pred], cc, len(ckeys), None if w is None else w[~is_pred], expm1=expm1)
    where = {k: i for i, k in enumerate(ckeys)}
    missing = [k[: len(ctx_cols)] for k in pkeys if k[: len(ctx_cols)] not in where]
    if missing:
        shown = ", ".join(",".join(map(str, c)) for c in missing)
        raise DataError(f"no control cells (predicted == False) for context(s) {shown}")
    ctrl_of = np.asarray([where[k[: len(ctx_cols)]] for k in pkeys], np.int64)
    return pm, cm[ctrl_of], pkeys, ctx_cols + label_cols


def log2_fold_changes(pred: AnnData, *, eps: float = LFC_EPS) -> pd.DataFrame:
    """log2((mean expm1 predicted + eps) / (mean expm1 control + eps)) per gene, per (context, perturbation)."""
    lay = _layout(pred)
    if lay.get("pseudobulk") or "n_cells" in pred.obs:
        raise DataError("log2_fold_changes needs cells, not pseudobulk rows: predict without pseudobulk")
    pm, cm, keys, cols = _pred_and_controls(pred, lay, expm1=True)
    lfc = np.log2((pm + eps) / (cm + eps))
    return pd.DataFrame(lfc, index=pd.MultiIndex.from_tuples(keys, names=cols), columns=pred.var_names.copy())


def pseudobulk_of(pred: AnnData) -> AnnData:
    """One row per (context, perturbation[, dose], sample, predicted): mean log1p expression, obs n_cells."""
    lay = _layout(pred)
    cols = [*lay["context_keys"], lay["pert_key"], *([lay["dose_key"]] if lay.get("dose_key") else [])]
    frame = pred.obs[cols].astype(str).assign(sample=pred.obs["sample"].to_numpy(np.int64),
                                              predicted=pred.obs["predicted"].to_numpy(bool))
    codes, uniq = pd.MultiIndex.from_frame(frame).factorize()
    X = group_means(pred.X, np.asarray(codes), len(uniq)).astype(np.float32)  # (n_groups, G)
    obs = uniq.to_frame(index=False)
    obs.columns = list(frame.columns)
    obs["n_cells"] = np.bincount(codes, minlength=len(uniq))
    for col in cols:
        obs[col] = obs[col].astype("category")
    obs.index = [f"pb_{i}" for i in range(len(obs))]
    out = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pred.var_names.copy()))
    out.uns["perturbdiff"] = {**pred.uns.get("perturbdiff", {}), "apply": json.dumps({**lay, "pseudobulk": True})}
    return out


# -- collapse diagnostic --------------------------------------------------------------------------------------
def _min_pairwise_r(shifts: np.ndarray) -> tuple[float, float]:
    """Minimum and mean off-diagonal Pearson r between the rows of [P, G] (NaN where a row is constant)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(shifts)
    off = r[~np.eye(len(r), dtype=bool)]
    if np.isnan(off).any():
        return float("nan"), float("nan")
    return float(off.min()), float(off.mean())


def _reference_r(reference: AnnData, pred: AnnData, lay: dict, labels: Sequence[str]) -> float:
    """Median over training contexts (with >= 2 of ``labels``) of the min pairwise r of real mean shifts."""
    keys = DataKeys.from_dict(get_record(reference)["keys"])  # a preprocessed (log1p) AnnData with a record
    genes = pd.Index(pred.var_names).intersection(reference.var_names, sort=False)
    if len(genes) < 2:
        raise DataError("the reference shares fewer than 2 genes with the prediction")
    cols = [*keys.context_keys, keys.pert_key]
    keep = reference.obs[keys.pert_key].astype(str).isin([*labels, keys.control_value]).to_numpy()
    sub = reference[keep][:, genes]
    codes, groups = _factorize(sub.obs, cols)
    means = group_means(sub.X, codes, len(groups))  # (n_groups, G')
    where = {g: i for i, g in enumerate(groups)}
    rs = []
    for ctx in dict.fromkeys(g[:-1] for g in groups):
        ctrl = where.get((*ctx, keys.control_value))
        rows = [where[(*ctx, p)] for p in labels if (*ctx, p) in where]
        if ctrl is not None and len(rows) >= 2:
            rs.append(_min_pairwise_r(means[rows] - means[ctrl])[0])
    rs = [r for r in rs if not np.isnan(r)]
    return float(np.median(rs)) if rs else float("nan")


def collapse_diagnostic(pred: AnnData, reference: AnnData | None = None, *, threshold: float = COLLAPSE_R,
                        warn: bool = True) -> pd.DataFrame:
    """Per context: min / mean pairwise Pearson r of predicted mean shifts (pred - control) across perturbations.

    ``collapsed`` = min r > threshold while the reference's (training data's) shifts are not (or could not be
    checked); a warning names those contexts.
    """
    lay = _layout(pred)
    pm, cm, keys, cols = _pred_and_controls(pred, lay)
    n_ctx = len(lay["context_keys"])
    not_ctrl = [i for i, k in enumerate(keys) if k[n_ctx] != lay["control"]]
    labels = list(dict.fromkeys(keys[i][n_ctx] for i in not_ctrl))
    ref_r = _reference_r(reference, pred, lay, labels) if reference is not None else float("nan")
    rows = []
    for ctx in dict.fromkeys(keys[i][:n_ctx] for i in not_ctrl):
        sel = [i for i in not_ctrl if keys[i][:n_ctx] == ctx]
        lo, mean = _min_pairwise_r(pm[sel] - cm[sel]) if len(sel) >= 2 else (float("nan"), float("nan"))
        collapsed = bool(lo > threshold and not ref_r > threshold)
        rows.append({"context": "/".join(ctx), "n_perturbations": len(sel), "min_r": lo, "mean_r": mean,
                     "reference_r": ref_r, "collapsed": collapsed})
    report = pd.DataFrame(rows, columns=["context", "n_perturbations", "min_r", "mean_r", "reference_r",
                                         "collapsed"])
    for row in report.itertuples():
        logger.info("collapse check %s: %d perturbations, min pairwise r of predicted shifts %.3f (reference %.3f)",
                    row.context, row.n_perturbations, row.min_r, row.reference_r)
    if warn and report["collapsed"].any():
        _warn_collapse(report, threshold, reference is not None)
    return report


def _warn_collapse(report: pd.DataFrame, threshold: float, checked: bool) -> None:
    bad = report[report["collapsed"]]
    ref = report["reference_r"].iloc[0]
    why = (f"the training data's shifts are less alike (median min r {ref:.2f})" if checked and not np.isnan(ref)
           else "the training data's shifts could not be checked (pass "
                + ("--reference TRAIN.h5ad" if is_cli() else "reference=") + " the run's preprocessed training data)"
           if not checked else "the reference holds no context with two of these perturbations")
    msg = (f"predicted responses of different perturbations are nearly identical in context(s) "
           f"{', '.join(bad['context'])} (all pairwise r of mean shifts > {threshold}, min "
           f"{bad['min_r'].min():.3f}); {why}. The model may ignore the perturbation (collapsed predictions).")
    warn(msg, stacklevel=4)
