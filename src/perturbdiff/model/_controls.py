"""Bring your own control cells: apply a trained run to new control populations.

``predict_for_controls`` replays the run's preprocessing on the user's cells (genes by name), treats every distinct
context-value tuple of them as one control pool and generates each requested perturbation from it through the one
generation path; ``perturbdiff.log2_fold_changes`` and ``collapse_diagnostic`` read the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data import UNKNOWN, Context, apply_record, get_record, obs_codes
from perturbdiff.evaluate import collapse_diagnostic, pseudobulk_of
from perturbdiff.model._generate import cells_to_generate, check_counts, check_doses
from perturbdiff.model._output import append_controls, assemble, output_uns, sampler_settings

RESERVED = ("sample", "predicted", "n_cells")



def predict_for_controls(model, controls: AnnData, perturbations: Sequence[str], *, context_keys: str | Sequence[str],
                         input_kind: str, missing_genes: str = "error", n_cells: int | None = None,
                         n_samples: int = 1, pseudobulk: bool = False, seed: int = 0, guidance: float | None = None,
                         steps: int | None = None, start: str | None = None, solver: str | None = None,
                         progress: bool = True, device=None,
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
    check_counts(n_samples=n_samples, n_cells=n_cells)
    dose_list = check_doses(model, doses)
    user_keys = _check_columns(model, controls, context_keys, batch_key)
    prepared = apply_record(controls, model.record, input_kind=input_kind, missing_genes=missing_genes)
    contexts, pools = _context_pools(prepared.obs, user_keys)
    unknown = _unknown_contexts(model, user_keys, contexts)
    conds = [(ctx, p, d) for ctx, pool in zip(contexts, pools) for p in perts for d in dose_list]
    cond_pools = [pool for pool in pools for _ in perts for _ in dose_list]
    counts = cells_to_generate(n_cells, conds, observed=[len(pool) for pool in cond_pools])
    settings = model.sample_settings(guidance=guidance, steps=steps, start=start, solver=solver)
    view = _run_view(model, prepared, user_keys, batch_key)
    doses = [c[2] for c in conds] if model.keys.dose_key is not None else None
    parts = model._cells(view, [c[:2] for c in conds], cond_pools, counts, settings=settings, n_samples=n_samples,
                         seed=seed, progress=progress, device=device, doses=doses,
                         unknown_pert=unknown_perturbations)
    pred = _with_user_controls(_assemble(model, parts, conds, user_keys, seed), prepared, model.keys, user_keys)
    pred.uns["perturbdiff"] = _uns(model, settings, prepared, user_keys, perts, unknown, input_kind=input_kind,
                                   n_samples=n_samples, seed=seed)
    logger.info("generated %d cells for %d condition(s) in %d context(s), %d sample(s)",
                int(pred.obs["predicted"].sum()), len(conds), len(contexts), n_samples)
    if len([p for p in perts if p != model.keys.control_value]) >= 2:
        collapse_diagnostic(pred, reference)
    return pseudobulk_of(pred) if pseudobulk else pred


def _uns(model, settings, prepared: AnnData, user_keys, perts, unknown, *, input_kind: str, n_samples: int,
         seed: int) -> dict:
    """uns["perturbdiff"]: scale, record and sampler settings (as PerturbDiff.predict) + how columns were mapped."""
    n_missing = int(get_record(prepared).get("applied", {}).get("n_missing_genes", 0))
    keys = model.keys
    layout = {"context_keys": list(user_keys), "run_context_keys": list(keys.context_keys),
              "pert_key": keys.pert_key, "control": keys.control_value, "dose_key": keys.dose_key,
              "perturbations": perts, "input_kind": input_kind, "n_missing_genes": n_missing,
              "unknown_contexts": unknown, "pseudobulk": False}
    return {**output_uns(model.record, **sampler_settings(settings, n_samples=n_samples, seed=seed)),
            "apply": json.dumps(layout)}


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


def _context_pools(obs: pd.DataFrame, user_keys: Sequence[str]) -> tuple[list[Context], list[np.ndarray]]:
    """Distinct context-value tuples of the user's cells and the (sorted) rows of each: the control pools."""
    cols = [obs_codes(obs, c) for c in user_keys]
    uniq, inv = np.unique(np.stack([c for c, _ in cols], axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    contexts = [tuple(cols[j][1][u[j]] for j in range(len(cols))) for u in uniq.tolist()]
    order = np.argsort(inv, kind="stable")
    return contexts, np.split(order, np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])


def _unknown_contexts(model, user_keys: Sequence[str], contexts: Sequence[Context]) -> dict[str, list[str]]:
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


# -- output -----------------------------------------------------------------------------------------------------
def _assemble(model, parts: list[np.ndarray], conds, user_keys: Sequence[str], seed: int) -> AnnData:
    """Predicted cells with the user's context column names (+ the run's dose column); a latent codec draws its
    zeros from (seed, part)."""
    keys, n = model.keys, len(conds)
    cells = [(j % n, j // n, model.codec.from_model(c, seed=(seed, j))) for j, c in enumerate(parts)]
    pred = assemble(cells, [c[:2] for c in conds], model.genes, keys.pert_key, user_keys)
    if keys.dose_key is not None:
        cond = np.repeat(np.arange(len(parts)) % n, [len(c) for c in parts])
        pred.obs[keys.dose_key] = np.asarray([c[2] for c in conds], dtype=object)[cond]
    return pred


def _with_user_controls(pred: AnnData, prepared: AnnData, keys, user_keys: Sequence[str]) -> AnnData:
    """Append the user's preprocessed control cells; key columns categorical."""
    obs = pd.DataFrame({keys.pert_key: keys.control_value}, index=prepared.obs_names.astype(str))
    for col in user_keys:
        obs[col] = prepared.obs[col].astype(str).to_numpy()
    return append_controls(pred, prepared.X, obs, [keys.pert_key, *user_keys, *([keys.dose_key] if keys.dose_key
                                                                                 else [])])
