"""Preprocessing with scanpy (normalize_total -> log1p -> HVGs of training cells) and its record."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import logger, warn
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._validate import (
    as_str_categorical,
    check_genes,
    check_input_kind,
    check_values,
    duplicate_names,
    register,
)

RECORD_FORMAT = 1
MODEL_SCALE = 10.0  # model space = log1p / scale (SPEC §1)
HVG_FLAVOR = "seurat"


def preprocess(
    adata: AnnData,
    keys: DataKeys,
    *,
    n_hvg: int = 2000,
    train_mask: np.ndarray | None = None,
    var_names: Sequence[str] | None = None,
    target_sum: float = 1e4,
    split=None,
) -> AnnData:
    """counts: normalize_total -> log1p (log1p input kept); genes = ``var_names`` or top HVGs of train cells.

    ``split``: choose the HVGs on its training cells (training conditions + every control cell; SPEC §1), or take
    its ``var_names`` when it brings them; ``train_mask`` gives the cells directly. Without either, the HVGs come
    from every cell, held-out ones included. Returns a new AnnData (X float32 CSR log1p); the record of every step
    is in uns["perturbdiff"]["record"].
    """
    if int(n_hvg) < 1:
        raise ConfigError(f"n_hvg must be at least 1, got {n_hvg}")
    register(adata, keys)
    if split is not None:
        from perturbdiff.data._split import training_mask

        if train_mask is not None:
            raise ConfigError("pass split or train_mask, not both")
        split.check(adata, keys)
        if split.var_names and var_names is None:
            var_names = split.var_names
        else:
            train_mask = training_mask(adata, keys, split)
    X = to_log1p(adata.X, keys.input_kind, target_sum)  # (N, G_all) CSR float32
    if var_names is not None:
        genes = given_genes(adata.var_names, var_names)
        selection: dict[str, Any] = {
            "method": "given",
            "n_top": len(genes),
            "flavor": None,
            "n_train_cells": None,
        }
    else:
        mask = hvg_cell_mask(train_mask, adata.n_obs)
        genes = hvg_genes(X, adata.var_names, mask, n_hvg)
        method = "hvg" if n_hvg < adata.n_vars else "all"
        selection = {
            "method": method,
            "n_top": len(genes),
            "flavor": HVG_FLAVOR,
            "n_train_cells": int(mask.sum()),
        }
    record = make_record(keys, genes, selection, target_sum)
    cols = adata.var_names.get_indexer(genes)
    out = AnnData(X=X[:, cols], obs=clean_obs(adata.obs, keys.columns), var=pd.DataFrame(index=pd.Index(genes)))
    out.uns["perturbdiff"] = {"record": json.dumps(record)}
    logger.info("preprocessed %d cells x %d genes (%s)", out.n_obs, out.n_vars, selection["method"])
    return out


def make_record(keys: DataKeys, genes: Sequence[str], selection: dict[str, Any], target_sum: float) -> dict[str, Any]:
    """The preprocessing record: keys, transform, genes and how they were chosen, model scale, versions."""
    return {
        "format": RECORD_FORMAT,
        "keys": keys.to_dict(),
        "input_kind": keys.input_kind,
        "normalize": {"target_sum": float(target_sum)} if keys.input_kind == "counts" else None,
        "log1p": keys.input_kind == "counts",
        "genes": list(genes),
        "gene_selection": selection,
        "scale": MODEL_SCALE,
        "versions": _versions(),
    }


def get_record(adata: AnnData) -> dict[str, Any]:
    """The preprocessing record stored by ``preprocess`` (DataError if absent or unreadable)."""
    entry = adata.uns.get("perturbdiff")
    raw = entry.get("record") if isinstance(entry, Mapping) else None
    if raw is None:
        raise DataError("no preprocessing record in uns['perturbdiff']['record']; run perturbdiff preprocess first")
    try:
        record = dict(raw) if isinstance(raw, Mapping) else json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise DataError(f"the preprocessing record in uns['perturbdiff']['record'] is not valid JSON: {e}") from None
    if not isinstance(record, dict) or "genes" not in record or "format" not in record:
        raise DataError("the preprocessing record in uns['perturbdiff']['record'] lacks 'format' or 'genes'")
    return record


def apply_record(
    adata: AnnData, record: Mapping[str, Any], *, input_kind: str, missing_genes: str = "error"
) -> AnnData:
    """Replay a record on new data: same normalisation/log1p, genes aligned BY NAME to ``record["genes"]``."""
    check_input_kind(input_kind)
    check_genes(adata.var_names)
    check_values(adata.X, input_kind)
    norm = record.get("normalize") or {}
    target_sum = float(norm.get("target_sum", 1e4))
    if input_kind == "counts" and not norm:
        warnings.warn(
            "the record comes from log1p input (its target_sum is unknown); normalising these counts to 1e4",
            stacklevel=2,
        )
    genes = [str(g) for g in record["genes"]]
    idx, missing = gene_index(adata.var_names, genes, missing_genes)
    X = _take_columns(to_log1p(adata.X, input_kind, target_sum), idx)  # (N, G_record)
    keys = record.get("keys") or {}
    cols = [c for c in DataKeys.from_dict(keys).columns if c in adata.obs.columns] if keys else []
    out = AnnData(X=X, obs=clean_obs(adata.obs, cols), var=pd.DataFrame(index=pd.Index(genes)))
    applied = {**dict(record), "applied": {"input_kind": input_kind, "n_missing_genes": missing}}
    out.uns["perturbdiff"] = {"record": json.dumps(applied)}
    return out


#: zero-filling more than this share of the run's genes is warned about loudly
ZERO_FILL_WARN = 0.05


def gene_index(var_names, genes: Sequence[str], missing_genes: str = "error",
               what: str = "the data") -> tuple[np.ndarray, int]:
    """(column of each of ``genes`` in ``var_names``, -1 where absent; the number absent), matched BY NAME.

    Absent genes are refused in one line naming them (the remedy in Python and CLI words), or, with
    ``missing_genes="zero"``, accepted: a few with a log line, more than ``ZERO_FILL_WARN`` of them loudly.
    """
    if missing_genes not in ("error", "zero"):
        raise ConfigError(f"missing_genes must be 'error' or 'zero', got {missing_genes!r}")
    idx = pd.Index(var_names).astype(str).get_indexer(genes)
    missing = [g for g, i in zip(genes, idx) if i < 0]
    if missing and missing_genes == "error":
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} of {len(genes)} of the run's genes are missing from {what}: {shown}",
                        python="pass missing_genes='zero' to fill them with zeros",
                        cli="pass --missing-genes zero to fill them with zeros")
    share = len(missing) / max(len(genes), 1)
    if share > ZERO_FILL_WARN:
        warn(f"{len(missing)} of {len(genes)} genes ({share:.0%}) are missing and filled with zeros: predictions "
             "for these cells rest on an incomplete profile and may be unreliable")
    elif missing:
        logger.info("%d of %d recorded genes are missing; filled with zeros", len(missing), len(genes))
    return idx, len(missing)


def align_genes(adata: AnnData, genes: Sequence[str], *, missing_genes: str = "error",
                what: str = "the data") -> AnnData:
    """``adata`` with exactly ``genes``, in that order, matched BY NAME: foreign genes are dropped, missing ones
    refused (one line naming them) or, with ``missing_genes="zero"``, filled with zeros. Returned unchanged when
    the genes already match; values are not transformed."""
    genes = [str(g) for g in genes]
    names = pd.Index(adata.var_names.astype(str))
    if names.equals(pd.Index(genes)):
        return adata
    check_genes(names)
    idx, n_missing = gene_index(names, genes, missing_genes, what)
    logger.info("genes of %s matched by name to the run's %d genes (%d dropped, %d zero-filled)",
                what, len(genes), len(names) - int((idx >= 0).sum()), n_missing)
    out = AnnData(X=_take_columns(_to_csr(adata.X), idx), obs=adata.obs.copy(),
                  var=pd.DataFrame(index=pd.Index(genes)))
    out.uns = dict(adata.uns)
    return out


def _to_csr(X) -> sp.csr_matrix:
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32, copy=True)
    if isinstance(X, np.ndarray):
        return sp.csr_matrix(X.astype(np.float32))
    blk = X[:]  # backed: read into memory
    return _to_csr(blk if sp.issparse(blk) else np.asarray(blk))


def to_log1p(X, input_kind: str, target_sum: float) -> sp.csr_matrix:
    """scanpy normalize_total(target_sum) -> log1p for counts; log1p input only cast. (N, G) CSR float32."""
    X = _to_csr(X)
    X.eliminate_zeros()
    if input_kind == "log1p":
        return X
    import scanpy as sc  # deferred: importing scanpy takes seconds

    tmp = AnnData(X=X)
    sc.pp.normalize_total(tmp, target_sum=target_sum)
    sc.pp.log1p(tmp)
    return sp.csr_matrix(tmp.X, dtype=np.float32)


def hvg_cell_mask(train_mask, n_obs: int) -> np.ndarray:
    """The cells that choose the HVGs: a given ``train_mask`` checked (bool, length ``n_obs``, not empty), or every
    cell when None. (A split's training cells come from :func:`perturbdiff.data.training_mask`.)"""
    if train_mask is None:
        return np.ones(n_obs, dtype=bool)
    mask = np.asarray(train_mask)
    if mask.dtype != bool or mask.shape != (n_obs,):
        raise DataError(f"train_mask must be a boolean array of length {n_obs}, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise DataError("train_mask selects no cells; HVGs need training cells")
    return mask


def hvg_genes(X: sp.csr_matrix, var_names: pd.Index, mask: np.ndarray, n_hvg: int) -> list[str]:
    """Top ``n_hvg`` seurat-flavour HVGs of the masked cells, in the data's gene order."""
    if n_hvg >= X.shape[1]:
        return [str(g) for g in var_names]
    import scanpy as sc  # deferred: importing scanpy takes seconds

    sub = AnnData(X=X[np.flatnonzero(mask)], var=pd.DataFrame(index=pd.Index(var_names.astype(str))))
    sc.pp.highly_variable_genes(sub, n_top_genes=n_hvg, flavor=HVG_FLAVOR)
    hv = sub.var["highly_variable"].to_numpy(dtype=bool)
    disp = np.nan_to_num(sub.var["dispersions_norm"].to_numpy(dtype=float), nan=-np.inf)
    return top_genes(hv, disp, n_hvg, var_names)


def top_genes(hv: np.ndarray, disp: np.ndarray, n_top: int, var_names: pd.Index) -> list[str]:
    """Names of the flagged HVGs; ties at the cut-off (more than n_top flagged) keep the highest dispersions."""
    if hv.sum() > n_top:
        keep = np.argsort(-np.where(hv, disp, -np.inf), kind="stable")[:n_top]
        hv = np.zeros_like(hv)
        hv[keep] = True
    if hv.sum() < n_top:
        logger.info("only %d genes qualify as HVGs (asked for %d)", int(hv.sum()), n_top)
    return [str(g) for g in var_names[hv]]


def given_genes(var_names: pd.Index, wanted: Sequence[str]) -> list[str]:
    """``wanted`` as strings, checked: no gene twice and every one present in ``var_names`` (DataError)."""
    genes = [str(g) for g in wanted]
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(dup):
        raise DataError(f"var_names lists genes more than once: {', '.join(map(str, dup[:10]))}")
    missing = [g for g, i in zip(genes, var_names.get_indexer(genes)) if i < 0]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} of the requested var_names are not in the data: {shown}")
    return genes


def _take_columns(X: sp.csr_matrix, idx: np.ndarray) -> sp.csr_matrix:
    """Columns ``idx`` of X in that order; ``-1`` gives an all-zero column."""
    present = np.flatnonzero(idx >= 0)
    sub = X[:, idx[present]].tocsr()
    sub.sort_indices()
    return sp.csr_matrix((sub.data, present[sub.indices], sub.indptr), shape=(X.shape[0], len(idx)))


def clean_obs(obs: pd.DataFrame, key_cols: Sequence[str]) -> pd.DataFrame:
    """A copy of obs with the key columns as categoricals of strings and a unique string index (repeated cell
    names get anndata's ``-1``, ``-2`` suffixes, with a warning: cells are told apart by name downstream)."""
    out = obs.copy()
    for c in key_cols:
        out[c] = as_str_categorical(obs[c])
    out.index = out.index.astype(str)
    n_dup = duplicate_names(out.index)
    if n_dup:
        from anndata.utils import make_index_unique

        out.index = make_index_unique(out.index)
        warn(f"{n_dup} cell names repeat an earlier one; made unique by appending -1, -2, ... "
             "(anndata's obs_names_make_unique)")
    return out


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("perturbdiff", "anndata", "scanpy", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
