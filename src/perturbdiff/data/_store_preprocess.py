"""Preprocessing data larger than memory (``adata`` may be backed) straight into a store, X read in chunks."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._preprocess import (
    HVG_FLAVOR,
    clean_obs,
    given_genes,
    hvg_cell_mask,
    make_record,
    to_log1p,
    top_genes,
)
from perturbdiff.data._store import CellStore, StoreMatrix
from perturbdiff.data._store_write import check_replaceable, store_order, write_store_blocks
from perturbdiff.data._validate import register


def preprocess_store(adata: AnnData, path: str | Path, keys: DataKeys, *, n_hvg: int = 2000,
                     train_mask: np.ndarray | None = None, var_names: Sequence[str] | None = None,
                     target_sum: float = 1e4, chunk_cells: int = 20_000) -> CellStore:
    """:func:`preprocess` for data larger than memory (``adata`` may be backed), written as a store.

    Same transform and genes as ``preprocess``: X is read in chunks of ``chunk_cells`` cells, once for the HVG
    moments (exact float64 sums over all training cells; recorded as ``gene_selection["moments"] = "chunked"``)
    and once to transform into a temporary file beside ``path``; the cells are then written sorted by condition.
    """
    if chunk_cells < 1:
        raise DataError(f"chunk_cells must be >= 1, got {chunk_cells}")
    if int(n_hvg) < 1:
        raise DataError(f"n_hvg must be at least 1, got {n_hvg}")
    path = Path(path)
    check_replaceable(path)
    register(adata, keys)
    genes, selection = _choose_genes(adata, keys, n_hvg, train_mask, var_names, target_sum, chunk_cells)
    record = make_record(keys, genes, selection, target_sum)
    obs = clean_obs(adata.obs, keys.columns)
    order = store_order(obs, keys)
    uns = {"perturbdiff": {"record": json.dumps(record)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".work") as work:
        cols = adata.var_names.get_indexer(genes)
        X = _spill(Path(work), adata, keys.input_kind, target_sum, cols, chunk_cells)
        return write_store_blocks(path, obs.iloc[order], pd.DataFrame(index=pd.Index(genes)), uns,
                                  X.blocks(order), X.nnz)


def _log1p_chunks(adata, kind: str, target_sum: float, chunk: int, mask: np.ndarray | None = None):
    """(first row, log1p CSR of rows [a, a + chunk)) over X; row-local, so equal to transforming X whole."""
    for a in range(0, adata.n_obs, chunk):
        if mask is None or mask[a : a + chunk].any():
            yield a, to_log1p(adata.X[a : a + chunk], kind, target_sum)


def _spill(work: Path, adata, kind: str, target_sum: float, cols: np.ndarray, chunk: int) -> StoreMatrix:
    """Transform X chunk by chunk, keep columns ``cols``, append to raw files in ``work``; read back lazily."""
    lens = [np.zeros(1, np.int64)]
    with open(work / "data", "wb") as fd, open(work / "indices", "wb") as fi:
        for _, blk in _log1p_chunks(adata, kind, target_sum, chunk):
            sub = sp.csr_matrix(blk[:, cols])
            sub.sort_indices()
            sub.data.astype("<f4").tofile(fd)
            sub.indices.astype("<i4").tofile(fi)
            lens.append(np.diff(sub.indptr))
    indptr = np.cumsum(np.concatenate(lens))
    return StoreMatrix.from_raw(work / "data", work / "indices", indptr, (adata.n_obs, len(cols)))


def _choose_genes(adata, keys: DataKeys, n_hvg: int, train_mask, var_names, target_sum: float,
                  chunk: int) -> tuple[list[str], dict[str, Any]]:
    """Genes and the record's gene_selection: given names, or the top seurat HVGs of the training cells."""
    if var_names is not None:
        genes = given_genes(adata.var_names, var_names)
        return genes, {"method": "given", "n_top": len(genes), "flavor": None, "n_train_cells": None}
    mask = hvg_cell_mask(train_mask, adata.n_obs)
    if n_hvg >= adata.n_vars:
        genes = [str(g) for g in adata.var_names]
    else:
        mean, var = _moments(adata, keys.input_kind, target_sum, mask, chunk)
        genes = _seurat_hvg(mean, var, adata.var_names, n_hvg)
    selection = {"method": "hvg" if n_hvg < adata.n_vars else "all", "n_top": len(genes), "flavor": HVG_FLAVOR,
                 "n_train_cells": int(mask.sum())}
    if n_hvg < adata.n_vars:
        selection["moments"] = "chunked"  # over all training cells, chunk by chunk (not a subsample)
    return genes, selection


def _moments(adata, kind: str, target_sum: float, mask: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance of expm1(log1p X) over the ``mask`` cells (scanpy's seurat input)."""
    G = adata.n_vars
    s1, s2 = np.zeros(G), np.zeros(G)
    for a, blk in _log1p_chunks(adata, kind, target_sum, chunk, mask):
        m = mask[a : a + blk.shape[0]]
        sub = blk if m.all() else blk[np.flatnonzero(m)]
        v = np.expm1(sub.data).astype(np.float64)
        s1 += np.bincount(sub.indices, weights=v, minlength=G)
        s2 += np.bincount(sub.indices, weights=v * v, minlength=G)
    n = int(mask.sum())
    mean = s1 / n
    var = (s2 / n - mean**2) * (n / (n - 1) if n > 1 else 1.0)
    return mean, var


def _seurat_hvg(mean: np.ndarray, var: np.ndarray, var_names: pd.Index, n_top: int) -> list[str]:
    """Top ``n_top`` genes by seurat-flavour normalised dispersion (scanpy's rule; ties as in preprocess)."""
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    df = pd.DataFrame({"dispersions": disp, "mean_bin": pd.cut(np.log1p(mean), bins=20)})
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    one = stats["dev"].isnull()  # a bin holding one gene: normalised dispersion 1
    stats.loc[one, "dev"], stats.loc[one, "avg"] = stats.loc[one, "avg"], 0.0
    per_gene = stats.loc[df["mean_bin"]]
    norm = (disp - per_gene["avg"].to_numpy()) / per_gene["dev"].to_numpy()
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    hv = np.nan_to_num(norm, nan=-np.inf) >= finite[min(n_top, finite.size) - 1]
    d32 = np.nan_to_num(norm.astype(np.float32), nan=-np.inf)  # ties: float32 dispersions, as scanpy stores them
    return top_genes(hv, d32, n_top, var_names)
