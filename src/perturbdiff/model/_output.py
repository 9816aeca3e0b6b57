"""The output layout of every prediction (SPEC §6): one log1p AnnData of predicted cells (``predicted=True``,
``sample`` = draw), the real control cells appended (``predicted=False``, ``sample=-1``), how it was made in
``uns["perturbdiff"]``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff.data import Condition, as_csr, condition_codes


def assemble(parts: Sequence[tuple[int, int, np.ndarray]], conditions: Sequence[Condition], genes: Sequence[str],
             pert_key: str, context_keys: Sequence[str]) -> AnnData:
    """(condition index, sample id, log1p cells [n, G]) triples → one AnnData of predicted cells."""
    X = sp.csr_matrix(np.concatenate([c for _, _, c in parts]))
    cc = np.concatenate([np.full(len(c), i) for i, _, c in parts]).astype(np.int64)
    obs = pd.DataFrame({pert_key: [conditions[i][1] for i in cc]})
    for j, col in enumerate(context_keys):
        obs[col] = [conditions[i][0][j] for i in cc]
    obs["sample"] = np.concatenate([np.full(len(c), k) for _, k, c in parts]).astype(np.int64)
    obs["predicted"] = True
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))


def append_controls(pred: AnnData, X, obs: pd.DataFrame, key_cols: Sequence[str]) -> AnnData:
    """``pred`` with control cells X (rows of ``obs``, which holds ``pred``'s key columns) appended, flagged
    ``predicted=False``, ``sample=-1``; the key columns categorical."""
    obs = obs.assign(sample=-1, predicted=False)
    obs = pd.concat([pred.obs, obs[pred.obs.columns.intersection(obs.columns)]])
    for col in key_cols:
        obs[col] = obs[col].astype("category")
    obs["sample"] = obs["sample"].astype(np.int64)
    obs["predicted"] = obs["predicted"].astype(bool)
    X = sp.vstack([as_csr(pred.X), as_csr(X)]).tocsr().astype(np.float32)
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(pred.var_names)))


def with_real_controls(pred: AnnData, adata: AnnData, keys, contexts: set[tuple[str, ...]]) -> AnnData:
    """``pred`` with the real control cells of ``contexts`` from ``adata`` appended."""
    code, present = condition_codes(adata, keys)
    want = [i for i, (ctx, p) in enumerate(present) if p == keys.control_value and ctx in contexts]
    rows = np.flatnonzero(np.isin(code, want))
    cols = [keys.pert_key, *keys.context_keys]
    if keys.dose_key is not None and keys.dose_key in adata.obs and keys.dose_key in pred.obs:
        cols.append(keys.dose_key)
    obs = adata.obs.iloc[rows][cols].astype(str)
    obs.index = [f"ctrl_{i}" for i in range(len(rows))]
    return append_controls(pred, adata.X[rows], obs, cols)


def output_uns(record: dict, **settings) -> dict:
    """What ``uns['perturbdiff']`` of a prediction holds: the space of X (log1p), the record and the settings."""
    return {"scale": "log1p", "record": json.dumps(record), "settings": json.dumps(settings)}


def sampler_settings(settings, **extra) -> dict:
    """The sampler settings a prediction records."""
    return {"guidance": settings.guidance, "steps": settings.steps, "start": settings.start, "solver": settings.solver,
            **extra}
