"""Bring your own control cells: apply a trained run to new control populations (issue 7).

``predict_for_controls`` replays the run's preprocessing on the user's cells (genes by name), treats every distinct
context-value tuple of them as one control pool and generates each requested perturbation from it;
``log2_fold_changes`` and ``collapse_diagnostic`` read the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import is_cli, logger, warn
from perturbdiff._model import with_sampler
from perturbdiff.data import DataKeys, apply_record, as_csr, get_record
from perturbdiff.data._split import obs_codes
from perturbdiff.data._vocab import UNKNOWN
from perturbdiff.predict import assemble, output_uns

COLLAPSE_R = 0.95  # pairwise Pearson r of predicted mean shifts above which responses count as collapsed
LFC_EPS = 0.01  # pseudocount of log2 fold changes, in normalised expression units (expm1 of log1p)
RESERVED = ("sample", "predicted", "n_cells")

Ctx = tuple[str, ...]


def predict_for_controls(model, controls: AnnData, perturbations: Sequence[str], *, context_keys: str | Sequence[str],
                         input_kind: str, missing_genes: str = "error", n_cells: int | None = None,
                         n_samples: int = 1, pseudobulk: bool = False, seed: int = 0, guidance: float | None = None,
                         steps: int | None = None, start: str | None = None, progress: bool = True, device=None,
                         doses: Sequence[str] | None = None, batch_key: str | None = None,
                         reference: AnnData | None = None, unknown_perturbations: str = "error") -> AnnData:
    """Generate each perturbation from every context pool of the user's control cells (log1p AnnData).

    ``context_keys`` are the user's obs columns, mapped in order onto the run's context columns; values never seen
    in training get the ``<unknown>`` context token. The user's preprocessed controls are appended
    (``predicted=False``, ``sample=-1``); ``pseudobulk=True`` returns one mean row per (context, perturbation,
    sample) with ``n_cells``. ``reference`` (the run's preprocessed training data) sharpens the collapse check.
    A perturbation part never seen in training is an error naming it, or, with ``unknown_perturbations="generic"``,
    the generic perturbation token.
    """
    perts = _check_perturbations(model, perturbations, unknown_perturbations)  # unknown: refused before any compute
    if n_samples < 1 or (n_cells is not None and n_cells < 1):
        raise ConfigError(f"n_samples and n_cells must be >= 1 (got {n_samples}, {n_cells})")
    dose_list = _check_doses(model, doses)
    user_keys = _check_columns(model, controls, context_keys, batch_key)
    prepared = apply_record(controls, model.record, input_kind=input_kind, missing_genes=missing_genes)
    contexts, pools = _context_pools(prepared.obs, user_keys)
    unknown = _unknown_contexts(model, user_keys, contexts)
    conds = [(ctx, p, d) for ctx, pool in zip(contexts, pools) for p in perts for d in dose_list]
    cond_pools = [pool for pool in pools for _ in perts for _ in dose_list]
    counts = [int(n_cells) if n_cells is not None else len(pool) for pool in cond_pools]
    dcfg = with_sampler(model.cfg.diffusion, guidance=guidance, sampler_steps=steps, sampler_start=start)
    view = _run_view(model, prepared, user_keys, batch_key)
    parts = _generate(model, dcfg, view, conds, cond_pools, counts, n_samples=n_samples, seed=seed,
                      device=device, progress=progress, unknown_pert=unknown_perturbations)
    pred = _with_user_controls(_assemble(model, parts, conds, user_keys), prepared, model.keys, user_keys)
    pred.uns["perturbdiff"] = _uns(model, dcfg, prepared, user_keys, perts, unknown, input_kind=input_kind,
                                   n_samples=n_samples, seed=seed)
    logger.info("generated %d cells for %d condition(s) in %d context(s), %d sample(s)",
                int(pred.obs["predicted"].sum()), len(conds), len(contexts), n_samples)
    if len([p for p in perts if p != model.keys.control_value]) >= 2:
        collapse_diagnostic(pred, reference)
    return pseudobulk_of(pred) if pseudobulk else pred


def _uns(model, dcfg, prepared: AnnData, user_keys, perts, unknown, *, input_kind: str, n_samples: int,
         seed: int) -> dict:
    """uns["perturbdiff"]: scale, record and sampler settings (as PerturbDiff.predict) + how columns were mapped."""
    settings = {"guidance": dcfg.guidance, "steps": dcfg.sampler_steps, "start": dcfg.sampler_start,
                "n_samples": n_samples, "seed": seed}
    n_missing = int(get_record(prepared).get("applied", {}).get("n_missing_genes", 0))
    keys = model.keys
    layout = {"context_keys": list(user_keys), "run_context_keys": list(keys.context_keys),
              "pert_key": keys.pert_key, "control": keys.control_value, "dose_key": keys.dose_key,
              "perturbations": perts, "input_kind": input_kind, "n_missing_genes": n_missing,
              "unknown_contexts": unknown, "pseudobulk": False}
    return {**output_uns(model.record, **settings), "apply": json.dumps(layout)}


# -- checks (all before any compute) --------------------------------------------------------------------------
def _check_perturbations(model, perturbations: Sequence[str], unknown: str = "error") -> list[str]:
    """Distinct requested labels, in order; Vocab.encode_pert raises a DataError naming an unknown part."""
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    labels = list(dict.fromkeys(str(p).strip() for p in perturbations if str(p).strip()))
    if not labels:
        raise DataError("no perturbations requested")
    model.vocab.encode_pert(labels, unknown)
    return labels


def _check_doses(model, doses: Sequence[str] | None) -> list[str | None]:
    """The doses to generate at: required (and known) for a run with a dose key, refused otherwise."""
    key = model.keys.dose_key
    doses = [str(d) for d in doses] if doses is not None else []
    if key is None:
        if doses:
            raise DataError(f"doses {doses} were given but the run has no dose key")
        return [None]
    known = model.vocab.dose[1:]
    if not doses:
        raise DataError(f"the run was trained with doses (column {key!r}): pass doses, e.g. {', '.join(known[:5])}")
    bad = [d for d in doses if d not in known]
    if bad:
        raise DataError(f"dose {bad[0]!r} was not seen in training (column {key!r}); known: {', '.join(known)}")
    return list(dict.fromkeys(doses))


def _check_columns(model, controls: AnnData, context_keys, batch_key: str | None) -> tuple[str, ...]:
    """The user's context columns: one per run context column, present, complete; controls only."""
    user = (context_keys,) if isinstance(context_keys, str) else tuple(str(c) for c in context_keys)
    run, keys = model.keys.context_keys, model.keys
    if len(user) != len(run) or len(set(user)) != len(user):
        raise DataError(f"context_keys {list(user)} must name {len(run)} distinct column(s) of your data, one for "
                        f"each context column of the run {list(run)}, in that order")
    clash = [c for c in user if c in (keys.pert_key, keys.dose_key, *RESERVED)]
    if clash:
        raise DataError(f"context column {clash[0]!r} clashes with an output column; rename it in your data")
    for col in (*user, *([batch_key] if batch_key else [])):
        obs_codes(controls.obs, col)  # missing column or missing values: DataError naming the column
    if keys.pert_key in controls.obs.columns:
        values = set(pd.unique(controls.obs[keys.pert_key].astype(str))) - {keys.control_value}
        if values:
            raise DataError(f"obs column {keys.pert_key!r} of your cells holds non-control values "
                            f"({', '.join(sorted(values)[:5])}): pass only control cells, e.g. "
                            f"adata[adata.obs[{keys.pert_key!r}] == {keys.control_value!r}]")
    if keys.batch_key is not None and batch_key is None:
        logger.info("the run has a batch key %r and no batch_key was given: your cells get the %s batch token",
                    keys.batch_key, UNKNOWN)
    return user


def _context_pools(obs: pd.DataFrame, user_keys: Sequence[str]) -> tuple[list[Ctx], list[np.ndarray]]:
    """Distinct context-value tuples of the user's cells and the (sorted) rows of each: the control pools."""
    cols = [obs_codes(obs, c) for c in user_keys]
    uniq, inv = np.unique(np.stack([c for c, _ in cols], axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    contexts = [tuple(cols[j][1][u[j]] for j in range(len(cols))) for u in uniq.tolist()]
    order = np.argsort(inv, kind="stable")
    return contexts, np.split(order, np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])


def _unknown_contexts(model, user_keys: Sequence[str], contexts: Sequence[Ctx]) -> dict[str, list[str]]:
    """Context values the run never saw, per user column (logged: they use the <unknown> token)."""
    out = {}
    for j, (ucol, rcol) in enumerate(zip(user_keys, model.keys.context_keys)):
        new = sorted({c[j] for c in contexts} - set(model.vocab.contexts[j][1:]))
        if new:
            out[ucol] = new
            logger.info("context value(s) %s of your column %r (run column %r) were never seen in training: "
                        "they get the %s context token", ", ".join(new), ucol, rcol, UNKNOWN)
    return out


def _run_view(model, prepared: AnnData, user_keys: Sequence[str], batch_key: str | None) -> AnnData:
    """The user's cells under the run's column names (all control; batch only when batch_key is given)."""
    keys = model.keys
    obs = pd.DataFrame({keys.pert_key: keys.control_value}, index=prepared.obs_names)
    for ucol, rcol in zip(user_keys, keys.context_keys):
        obs[rcol] = prepared.obs[ucol].astype(str).to_numpy()
    if batch_key is not None and keys.batch_key is None:
        logger.info("the run has no batch key: batch_key %r is ignored", batch_key)
    elif batch_key is not None:
        obs[keys.batch_key] = prepared.obs[batch_key].astype(str).to_numpy()
        new = sorted(set(obs[keys.batch_key]) - set(model.vocab.batch[1:]))
        if new:
            logger.info("batch value(s) %s were never seen in training: they get the %s batch token",
                        ", ".join(new), UNKNOWN)
    return AnnData(X=prepared.X, obs=obs, var=pd.DataFrame(index=prepared.var_names))


# -- generation -----------------------------------------------------------------------------------------------
def _generate(model, dcfg, view: AnnData, conds, pools, n_cells, *, n_samples: int, seed: int, device, progress,
              unknown_pert: str = "error"):
    """The model's own sampling path, with each condition's dose; cells per (sample, condition)."""
    doses = [c[2] for c in conds] if model.keys.dose_key is not None else None
    return model._sample(model.network, view, pools, [c[:2] for c in conds], n_cells, dcfg=dcfg,
                         n_samples=n_samples, seed=seed, progress=progress, device=device, doses=doses,
                         unknown_pert=unknown_pert)


def _assemble(model, parts: list[np.ndarray], conds, user_keys: Sequence[str]) -> AnnData:
    """Predicted cells with the user's context column names (+ the run's dose column)."""
    keys = model.keys
    out_keys = DataKeys(keys.pert_key, keys.control_value, tuple(user_keys), "log1p")
    n = len(conds)
    pred = assemble([(j % n, j // n, c) for j, c in enumerate(parts)], [c[:2] for c in conds], model.genes,
                    out_keys, scale=model.scale)
    if keys.dose_key is not None:
        cond = np.repeat(np.arange(len(parts)) % n, [len(c) for c in parts])
        pred.obs[keys.dose_key] = np.asarray([c[2] for c in conds], dtype=object)[cond]
    return pred


def _with_user_controls(pred: AnnData, prepared: AnnData, keys: DataKeys, user_keys: Sequence[str]) -> AnnData:
    """Append the user's preprocessed control cells (predicted=False, sample=-1); key columns categorical."""
    obs = pd.DataFrame({keys.pert_key: keys.control_value}, index=prepared.obs_names.astype(str))
    for col in user_keys:
        obs[col] = prepared.obs[col].astype(str).to_numpy()
    obs["sample"], obs["predicted"] = -1, False
    obs = pd.concat([pred.obs, obs[pred.obs.columns.intersection(obs.columns)]])
    for col in (keys.pert_key, *user_keys, *([keys.dose_key] if keys.dose_key else [])):
        obs[col] = obs[col].astype("category")
    obs["sample"] = obs["sample"].astype(np.int64)
    obs["predicted"] = obs["predicted"].astype(bool)
    X = sp.vstack([as_csr(pred.X), as_csr(prepared.X)]).tocsr().astype(np.float32)
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(pred.var_names)))


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


def _group_means(X, codes: np.ndarray, n: int, weights: np.ndarray | None = None, *,
                 expm1: bool = False) -> np.ndarray:
    """Weighted mean of the rows of X per group code: indicator matrix [n, N] @ X [N, G] -> [n, G]."""
    X = as_csr(X)
    if expm1:
        X = X.copy()
        X.data = np.expm1(X.data)
    w = np.ones(len(codes)) if weights is None else np.asarray(weights, float)
    M = sp.csr_matrix((w, (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    total = np.asarray(M.sum(1)).ravel()
    return np.asarray((M @ X).todense(), dtype=np.float64) / np.maximum(total, 1e-12)[:, None]


def _pred_and_controls(pred: AnnData, lay: dict, *, expm1: bool = False):
    """Mean of predicted cells per (context, label) and of controls per context, and the group keys."""
    ctx_cols = list(lay["context_keys"])
    label_cols = [lay["pert_key"], *([lay["dose_key"]] if lay.get("dose_key") else [])]
    is_pred = pred.obs["predicted"].to_numpy(bool)
    w = pred.obs["n_cells"].to_numpy(float) if "n_cells" in pred.obs else None
    pc, pkeys = _factorize(pred.obs[is_pred], ctx_cols + label_cols)
    cc, ckeys = _factorize(pred.obs[~is_pred], ctx_cols)
    pm = _group_means(pred.X[is_pred], pc, len(pkeys), None if w is None else w[is_pred], expm1=expm1)
    cm = _group_means(pred.X[~is_pred], cc, len(ckeys), None if w is None else w[~is_pred], expm1=expm1)
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
    X = _group_means(pred.X, np.asarray(codes), len(uniq)).astype(np.float32)  # (n_groups, G)
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
    means = _group_means(sub.X, codes, len(groups))  # (n_groups, G')
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
