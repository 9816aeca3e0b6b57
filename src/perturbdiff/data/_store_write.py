"""Writing a store (format in :mod:`perturbdiff.data._store`): cells sorted stably by condition, X filled block by
block into contiguous page-aligned datasets, the directory replaced atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._io import current_umask
from perturbdiff._logging import logger
from perturbdiff._version import __version__
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._matrix import as_csr
from perturbdiff.data._preprocess import get_record
from perturbdiff.data._split import condition_codes
from perturbdiff.data._store import CELLS, FORMAT, MARKER, VERSION, CellStore, is_store, open_store, rows_per_block

_ALIGN = 4096  # byte alignment of X's datasets in the file


def write_store(adata: AnnData, path: str | Path) -> CellStore:
    """Write a preprocessed in-memory AnnData as a store: cells sorted stably by condition, atomically."""
    keys = DataKeys.from_dict(get_record(adata)["keys"])
    X = as_csr(adata.X)
    order = store_order(adata.obs, keys)
    step = rows_per_block(X.nnz, adata.n_obs)
    blocks = (X[order[a : a + step]] for a in range(0, adata.n_obs, step))
    return write_store_blocks(path, adata.obs.iloc[order], adata.var, dict(adata.uns), blocks, X.nnz)


def store_order(obs: pd.DataFrame, keys: DataKeys) -> np.ndarray:
    """The cells' order in a store: sorted stably by condition code (each condition keeps its cells' order)."""
    return np.argsort(_group_codes(obs, keys)[0], kind="stable")


def check_replaceable(path: Path) -> None:
    """DataError unless ``path`` is free or holds a store (a store is only ever written over a store)."""
    if path.exists() and not is_store(path):
        raise DataError(f"{path} exists and is not a perturbdiff store (no {MARKER}); refusing to replace it")


def _group_codes(obs: pd.DataFrame, keys: DataKeys) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-cell condition code [N] and the labels of each code present (context columns, perturbation)."""
    code, conds = condition_codes(SimpleNamespace(obs=obs, n_obs=len(obs)), keys)
    table = pd.DataFrame({col: [c[0][j] for c in conds] for j, col in enumerate(keys.context_keys)})
    table[keys.pert_key] = [c[1] for c in conds]
    return code, table


def _groups(obs: pd.DataFrame, keys: DataKeys) -> pd.DataFrame:
    """The group index: each condition's labels and rows [start, end) (ValueError if they are not contiguous)."""
    code, table = _group_codes(obs, keys)
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]]) if len(code) else np.zeros(0, np.int64)
    if len(starts) != len(table):
        raise ValueError("the cells are not grouped by condition")
    out = table.iloc[code[starts]].reset_index(drop=True)
    out["start"], out["end"] = starts.astype(int), np.r_[starts[1:], len(code)].astype(int)
    return out


def write_store_blocks(path: str | Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict,
                       blocks: Iterable[sp.spmatrix], nnz: int) -> CellStore:
    """Write cells grouped by condition as a store, atomically, never holding X whole: obs in store order
    (:func:`store_order`), X as CSR blocks in that order holding ``nnz`` values in all, uns with the record."""
    path = Path(path)
    keys = DataKeys.from_dict(get_record(SimpleNamespace(uns=uns))["keys"])
    groups = _groups(obs, keys)
    meta = {"format": FORMAT, "version": VERSION, "n_obs": len(obs), "n_vars": len(var), "nnz": int(nnz),
            "file": CELLS, "sorted_by": "condition", "perturbdiff": __version__,
            "groups": {c: [None if pd.isna(v) else v for v in groups[c].tolist()] for c in groups.columns}}
    with _staging(path) as tmp:
        _write_h5(tmp / CELLS, obs, var, uns, blocks, int(nnz))
        (tmp / MARKER).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        for name in (CELLS, MARKER):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
    logger.info("wrote store %s: %d cells x %d genes, %d groups", path, len(obs), len(var), len(groups))
    return open_store(path)


def _write_h5(file: Path, obs, var, uns, blocks: Iterable[sp.spmatrix], nnz: int) -> None:
    """obs / var / uns through anndata, then X as CSR in contiguous page-aligned datasets, filled block by block."""
    AnnData(obs=obs, var=var, uns=uns).write_h5ad(file)
    n = len(obs)
    with h5py.File(file, "r+", alignment_threshold=1, alignment_interval=_ALIGN) as f:
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, len(var))})
        data = g.create_dataset("data", (nnz,), np.float32)
        indices = g.create_dataset("indices", (nnz,), np.int32)
        indptr = np.zeros(n + 1, np.int64)
        r = e = 0
        for blk in blocks:
            blk = sp.csr_matrix(blk, dtype=np.float32)
            blk.sort_indices()
            k, m = blk.nnz, blk.shape[0]
            if r + m > n or e + k > nnz:
                raise ValueError("the blocks hold more cells or values than announced")
            if k:
                data[e : e + k], indices[e : e + k] = blk.data, blk.indices
            indptr[r + 1 : r + 1 + m] = e + blk.indptr[1:]
            r, e = r + m, e + k
        if (r, e) != (n, nnz):
            raise ValueError(f"the blocks hold {r} cells and {e} values, announced {n} and {nnz}")
        g.create_dataset("indptr", data=indptr)


@contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A temporary directory beside ``path`` that replaces it on success and is removed on any failure."""
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        old = tmp.with_suffix(".old") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
