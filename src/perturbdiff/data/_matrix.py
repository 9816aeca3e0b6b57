"""Expression matrices as the package reads them: in-memory CSR, lazy store rows, and group means (pseudobulks)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from perturbdiff._errors import DataError


def as_csr(X) -> sp.csr_matrix:
    """X as an in-memory float32 CSR matrix (no copy when it already is one)."""
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    if isinstance(X, np.ndarray):
        return sp.csr_matrix(X.astype(np.float32, copy=False))
    raise DataError(f"X must be in memory (numpy or scipy sparse) for the set sampler, got {type(X).__name__}")


def row_reader(X):
    """X for row gathers ``X[rows]`` -> CSR: a store's lazy matrix (``lazy_rows``) as it is, else in-memory CSR."""
    return X if getattr(X, "lazy_rows", False) else as_csr(X)


def group_means(X, codes: np.ndarray, n_groups: int, weights: np.ndarray | None = None, *,
                expm1: bool = False) -> np.ndarray:
    """Weighted mean row of X per group code by one sparse indicator product [n_groups, N] @ X [N, G] (float64).

    Rows with a negative code are ignored; ``expm1`` averages expm1(X) (normalised expression from log1p). A store's
    lazy matrix is read in blocks of its kept rows.
    """
    codes = np.asarray(codes, np.int64)
    keep = np.flatnonzero(codes >= 0)
    if expm1:
        X = as_csr(X).copy()
        X.data = np.expm1(X.data)
    w = np.ones(len(keep)) if weights is None else np.asarray(weights, np.float64)[keep]
    total = np.bincount(codes[keep], weights=w, minlength=n_groups)
    if getattr(X, "lazy_rows", False):  # a store: the kept rows gathered in blocks
        out = np.zeros((n_groups, X.shape[1]))
        for i in range(0, len(keep), 8192):
            sl = slice(i, i + 8192)
            ind = sp.csr_matrix((w[sl], (codes[keep[sl]], np.arange(len(keep[sl])))), shape=(n_groups, len(keep[sl])))
            out += np.asarray((ind @ X[keep[sl]]).toarray())
    else:
        ind = sp.csr_matrix((w, (codes[keep], keep)), shape=(n_groups, X.shape[0]))
        out = ind @ X  # (K, G)
        out = np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64)
    return out / np.maximum(total, 1e-12)[:, None]
