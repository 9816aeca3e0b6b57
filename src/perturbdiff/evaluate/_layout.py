"""The real / predicted AnnData pair in the layout cell-eval reads (benchmarks/README.md protocol, step 2).

``real`` = real perturbed cells of the evaluated conditions + the control cells of their contexts; ``pred`` =
predicted cells + the *same* control cells. Both in log1p space, same genes in the same order, one obs
column for the perturbation and one for the context. Everything the user can get wrong is checked here,
with a DataError that names the gene, column, context or condition.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data import DataKeys, Split, condition_codes, labels, value_stats

# not yet on perturbdiff.data's public face (its _WHERE): import from there once it is

SAMPLE_COL = "sample"  # obs column of predictions that hold several sampled response distributions
JOINED_CONTEXT_COL = "context"  # added when there are several context columns
CONTEXT_SEP = " | "
LOG1P_MAX = 15.0  # cell-eval rejects larger values as "not log1p"


def context_column(adata: AnnData, context_cols: list[str] | tuple[str, ...]) -> tuple[AnnData, str]:
    """One obs column naming the context: the column itself, or the values joined by `` | `` (new AnnData)."""
    cols = list(context_cols)
    for col in cols:
        _require_column(adata, col, "data")
    if len(cols) == 1:
        return adata, cols[0]
    obs = adata.obs.copy()
    joined = obs[cols[0]].astype(str)
    for col in cols[1:]:
        joined = joined + CONTEXT_SEP + obs[col].astype(str)
    obs[JOINED_CONTEXT_COL] = pd.Categorical(joined.to_numpy())
    return AnnData(X=adata.X, obs=obs, var=adata.var), JOINED_CONTEXT_COL


def build_real(adata_prep: AnnData, split: Split, subset: str = "test") -> AnnData:
    """Real cells of the ``subset`` conditions + the control cells of their contexts (genes: var_names)."""
    keys = DataKeys(split.pert_col, split.control, tuple(split.context_cols), "log1p")
    conds = split.subset(subset)
    if not conds:
        raise DataError(f"split {split.name!r} has no {subset} conditions")
    codes, present = condition_codes(adata_prep, keys)
    wanted = set(conds)
    absent = [c for c in conds if c not in set(present)]
    if absent:
        raise DataError(f"scoring needs the real cells of every {subset} condition; {len(absent)} have none in the "
                        f"data: {labels(absent)}")
    contexts = {c for c, _ in conds}
    take = np.array([c in wanted or (c[0] in contexts and c[1] == split.control) for c in present], bool)
    no_ctrl = sorted(contexts - {c[0] for c in present if c[1] == split.control})
    if no_ctrl:
        raise DataError(f"context(s) {', '.join(','.join(c) for c in no_ctrl)} have no {split.control!r} cells in "
                        f"column {split.pert_col!r}")
    rows = np.flatnonzero(take[codes])
    genes = _genes_for(adata_prep, split.var_names)
    X = adata_prep[rows, genes].X if genes is not None else adata_prep.X[rows]
    obs = pd.DataFrame(
        {col: pd.Categorical(adata_prep.obs[col].to_numpy()[rows].astype(str)) for col in keys.columns},
        index=adata_prep.obs_names[rows],
    )
    var = pd.DataFrame(index=pd.Index(genes if genes is not None else adata_prep.var_names))
    real = AnnData(X=_float32(X), obs=obs, var=var)
    return context_column(real, split.context_cols)[0]


def _genes_for(adata: AnnData, var_names: list[str] | None) -> list[str] | None:
    if var_names is None or list(adata.var_names) == list(var_names):
        return None
    missing = pd.Index(var_names).difference(adata.var_names)
    if len(missing):
        raise DataError(f"{len(missing)} gene(s) of the split's var_names are not in the data, e.g. {missing[0]!r}")
    return list(var_names)


def _float32(X):
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return np.asarray(X, dtype=np.float32)


def _require_column(adata: AnnData, col: str, side: str) -> None:
    if col not in adata.obs.columns:
        shown = ", ".join(repr(c) for c in list(adata.obs.columns)[:12])
        raise DataError(f"{side} has no obs column {col!r}; its columns are: {shown or 'none'}")


def _align_genes(pred: AnnData, real: AnnData) -> AnnData:
    """Same genes in the same order as ``real``: reorder ``pred`` if only the order differs."""
    if pred.var_names.equals(real.var_names):
        return pred
    lacking, extra = real.var_names.difference(pred.var_names), pred.var_names.difference(real.var_names)
    if len(lacking) or len(extra):
        parts = []
        if len(lacking):
            parts.append(f"{len(lacking)} real gene(s) missing from pred, e.g. {lacking[0]!r}")
        if len(extra):
            parts.append(f"{len(extra)} pred gene(s) not in real, e.g. {extra[0]!r}")
        raise DataError("pred and real genes differ: " + "; ".join(parts))
    logger.info("pred genes are in another order than real: reordered by name")
    return pred[:, real.var_names]


def _labels(adata: AnnData, pert_col: str, context_col: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "context": adata.obs[context_col].astype(str).to_numpy(),
            "pert": adata.obs[pert_col].astype(str).to_numpy(),
        }
    )


def _check_values(X, side: str) -> None:
    """Finite, non-negative log1p values below cell-eval's limit, not whole numbers (it would renormalise)."""
    s = value_stats(X)
    if s.n_nan or s.n_inf:
        raise DataError(f"{side} X has {s.n_nan} NaN and {s.n_inf} infinite values")
    if s.n_neg:
        raise DataError(f"{side} X has {s.n_neg} negative values (min {s.min:.4g}); log1p values are >= 0")
    if s.max >= LOG1P_MAX:
        raise DataError(f"{side} X has values up to {s.max:.4g}; log1p values must stay below {LOG1P_MAX:g} (clip)")
    if s.n and s.n_nonint == 0 and s.max > 0:
        raise DataError(f"{side} X holds only whole numbers (counts?); evaluation needs log1p values")


def select_sample(pred: AnnData, sample: str | None = None) -> AnnData:
    """Predictions with several sampled distributions (obs ``sample``): keep one (default: the first).

    Only generated cells count (obs ``predicted`` when present): control cells carried along keep their rows.
    """
    if SAMPLE_COL not in pred.obs.columns:
        return pred
    generated = pred.obs["predicted"].astype(bool).to_numpy() if "predicted" in pred.obs else np.ones(pred.n_obs, bool)
    labels = pred.obs[SAMPLE_COL].astype(str).to_numpy()
    values = pd.Index(pd.unique(labels[generated])).sort_values()
    if len(values) <= 1:
        return pred
    chosen = values[0] if sample is None else str(sample)
    if chosen not in values:
        raise DataError(f"sample {chosen!r} not in pred column {SAMPLE_COL!r} (values: {', '.join(values[:8])})")
    logger.info(f"pred holds {len(values)} samples; metrics use sample {chosen!r} (the report shows the spread)")
    return pred[~generated | (labels == chosen)]


def make_pair(
    pred: AnnData, real: AnnData, *, pert_col: str, control: str, context_col: str
) -> tuple[AnnData, AnnData]:
    """Validate and assemble ``(pred + real controls, real)``, each with obs ``pert_col``, ``context_col``."""
    for col in (pert_col, context_col):
        _require_column(real, col, "real")
        _require_column(pred, col, "pred")
    pred = _align_genes(select_sample(pred), real)
    p_lab, r_lab = _labels(pred, pert_col, context_col), _labels(real, pert_col, context_col)
    is_pred_ctrl = (p_lab["pert"] == control).to_numpy()
    if is_pred_ctrl.any():
        logger.info(f"dropped {int(is_pred_ctrl.sum())} {control!r} cells from pred: the real control cells are used")
        pred, p_lab = pred[~is_pred_ctrl], p_lab[~is_pred_ctrl].reset_index(drop=True)
    is_ctrl = (r_lab["pert"] == control).to_numpy()
    _check_conditions(p_lab, r_lab[~is_ctrl], pert_col, context_col)
    tested = set(r_lab["context"][~is_ctrl])
    no_ctrl = sorted(tested - set(r_lab["context"][is_ctrl]))
    if no_ctrl:
        raise DataError(f"real has no {control!r} cells (column {pert_col!r}) for {context_col}={no_ctrl[0]!r}")
    keep = np.flatnonzero(~is_ctrl | r_lab["context"].isin(tested).to_numpy())
    real = _clean(real, keep, r_lab, pert_col, context_col, "real")
    _check_values(real.X, "real")
    _check_values(pred.X, "pred")
    ctrl = np.flatnonzero((real.obs[pert_col] == control).to_numpy())
    X = _stack(pred.X, real.X[ctrl])
    labels = pd.concat([p_lab, _labels(real, pert_col, context_col).iloc[ctrl]], ignore_index=True)
    full = AnnData(X=X, obs=_obs(labels, pert_col, context_col, "pred"), var=pd.DataFrame(index=real.var_names))
    return full, real


def _check_conditions(p_lab: pd.DataFrame, r_lab: pd.DataFrame, pert_col: str, context_col: str) -> None:
    """Every perturbed (context, perturbation) of real must be predicted, and nothing else."""
    p_set = set(map(tuple, p_lab[["context", "pert"]].drop_duplicates().to_numpy()))
    r_set = set(map(tuple, r_lab[["context", "pert"]].drop_duplicates().to_numpy()))
    if not r_set:
        raise DataError(f"real has no perturbed cells (only control values in {pert_col!r})")
    problems = []
    for side, absent in (("pred", sorted(r_set - p_set)), ("real", sorted(p_set - r_set))):
        if absent:
            ctx, pert = absent[0]
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            problems.append(f"{side} has no cells of {pert_col}={pert!r} in {context_col}={ctx!r}{more}")
    if problems:
        raise DataError("; ".join(problems))


def _clean(adata: AnnData, rows: np.ndarray, lab: pd.DataFrame, pert_col: str, ctx_col: str, p: str) -> AnnData:
    X = adata.X[rows]
    return AnnData(
        X=_float32(X), obs=_obs(lab.iloc[rows], pert_col, ctx_col, p), var=pd.DataFrame(index=adata.var_names)
    )


def _obs(lab: pd.DataFrame, pert_col: str, context_col: str, prefix: str) -> pd.DataFrame:
    obs = pd.DataFrame({pert_col: pd.Categorical(lab["pert"].to_numpy())})
    if context_col != pert_col:
        obs[context_col] = pd.Categorical(lab["context"].to_numpy())
    obs.index = pd.Index(np.char.add(f"{prefix}-", np.arange(len(obs)).astype(str)))
    return obs


def _stack(a, b):
    """Row-stack two matrices in the format of the first (float32)."""
    if sp.issparse(a):
        return sp.vstack([sp.csr_matrix(a), sp.csr_matrix(b)], format="csr", dtype=np.float32)
    b = b.toarray() if sp.issparse(b) else b
    return np.concatenate([np.asarray(a, np.float32), np.asarray(b, np.float32)], axis=0)
