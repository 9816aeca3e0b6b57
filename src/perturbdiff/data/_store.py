"""Out-of-core cell store: cells grouped by condition in a contiguous-CSR .h5ad, rows read by memory map.

A store is a directory ``DIR``:

- ``DIR/store.json``: the marker (format, version, shape, number of stored values) and the group index, each
  condition's rows ``[start, end)``. Cells are sorted *stably* by condition: a set (S cells of one condition x batch
  x dose unit) lies in one contiguous region of the file, and every unit, control pool and condition keeps its
  cells' original relative order, so the set sampler draws the very same cells as from the in-memory AnnData.
- ``DIR/cells.h5ad``: a valid .h5ad (``anndata.read_h5ad`` reads it) with obs, var, uns (the preprocessing record)
  and X as CSR whose ``data`` / ``indices`` are contiguous, uncompressed, page-aligned HDF5 datasets.

``open_store`` keeps obs, var, uns and the row pointers in memory and only byte offsets for X. ``X[rows]`` maps the
file read-only, gathers every requested row with one vectorised index (no HDF5 call per row) and unmaps it, so the
resident memory holds one batch, never the matrix. Format chosen by measurement (docs/PERFORMANCE.md, "Out-of-core
store"): with the file in the page cache 2-7x the set reads/s of h5py row slices, 4-12x anndata's backed CSR and
15-40x zarr.

Writing a store is :mod:`perturbdiff.data._store_write`; preprocessing data larger than memory into one,
:mod:`perturbdiff.data._store_preprocess`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff.data._matrix import as_csr

MARKER, CELLS, FORMAT, VERSION = "store.json", "cells.h5ad", "perturbdiff-store", 1
_BLOCK = 1 << 22  # stored values per block when writing or scanning (bounds temporary memory to ≈ 50 MB)
_PAGE = mmap.PAGESIZE
_FADVISE = hasattr(os, "posix_fadvise")  # Linux / BSD: announce a gather's pages (parallel reads when not cached)
_COLD_US_PER_ROW = 50.0  # a gather slower than 1 ms + this per row waited on the disk (cached ≈ 5, disk ≈ 600 µs)
_PREFETCH_GATHERS = 32  # after such a gather, announce the pages of this many gathers, then try without again


# -- reading ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Flat:
    """A 1-D array stored contiguously in a file at a byte offset, read through a short-lived memory map."""

    path: str
    offset: int
    dtype: str
    size: int

    def take(self, idx: slice | np.ndarray, spans: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Elements ``idx`` as an in-memory copy; the map is closed again, so none of its pages stay resident.

        ``spans`` (element ranges [lo, hi) that ``idx`` covers) are announced to the kernel first (read-ahead of
        all their pages at once), so pages not in the page cache are read in parallel rather than one fault at a time.
        """
        if self.size == 0:
            return np.zeros(0, self.dtype)[idx]
        with open(self.path, "rb") as fh:
            fd = fh.fileno()
            if spans is not None and _FADVISE:
                for start, length in zip(*self._pages(*spans)):
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                arr = np.frombuffer(mm, self.dtype, self.size, self.offset)
                out = arr[idx].copy() if isinstance(idx, slice) else arr[idx]  # fancy indexing copies already
                del arr  # no view may outlive the map
        return out

    def _pages(self, lo: np.ndarray, hi: np.ndarray) -> tuple[list[int], list[int]]:
        """Byte (start, length) of the merged runs of whole pages holding elements [lo, hi)."""
        item, keep = np.dtype(self.dtype).itemsize, hi > lo  # empty rows hold no page
        s, e = (self.offset + lo[keep] * item) // _PAGE, -(-(self.offset + hi[keep] * item) // _PAGE)
        if not len(s):
            return [], []
        order = np.argsort(s, kind="stable")
        s, e = s[order], np.maximum.accumulate(e[order])
        first = np.flatnonzero(np.r_[True, s[1:] > e[:-1]])  # a gap before a range starts a new run
        last = np.r_[first[1:] - 1, len(s) - 1]
        return (s[first] * _PAGE).tolist(), ((e[last] - s[first]) * _PAGE).tolist()


class StoreMatrix:
    """X of a store, never loaded whole: ``X[rows]`` -> scipy CSR float32 (rows: ints in any order, repeats
    allowed, a boolean mask or a slice); ``shape``, ``dtype``, ``nnz``, ``to_memory()``."""

    lazy_rows = True  # perturbdiff.data._sets.row_reader passes such an X through instead of converting it
    # announce a gather's pages to the kernel first: ≈ 13x faster reads from disk, ≈ 2-3x slower from the page cache.
    # None (automatic): on for the next _PREFETCH_GATHERS gathers after one that waited on the disk; True / False.
    prefetch: bool | None = None
    _prefetch_left = 0

    def __init__(self, data: _Flat, indices: _Flat, indptr: np.ndarray, shape: tuple[int, int]):
        self._data, self._indices = data, indices
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype, self.ndim = np.dtype(np.float32), 2

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def __repr__(self) -> str:
        return f"StoreMatrix({self.shape[0]} x {self.shape[1]}, {self.nnz} stored values in {self._data.path})"

    def __getitem__(self, key) -> sp.csr_matrix:
        rows = self._rows(key)
        if isinstance(rows, slice):  # one contiguous range: the kernel's sequential read-ahead serves it
            lo, hi = int(self.indptr[rows.start]), int(self.indptr[rows.stop])
            ptr, el = self.indptr[rows.start : rows.stop + 1] - lo, slice(lo, hi)
            return self._csr(el, ptr, None)
        ptr, el = self.elements(rows)
        auto = self.prefetch is None
        on = self._prefetch_left > 0 if auto else self.prefetch
        t = time.perf_counter()
        out = self._csr(el, ptr, (self.indptr[rows], self.indptr[rows + 1]) if on else None)
        if auto and on:
            self._prefetch_left -= 1
        elif auto and time.perf_counter() - t > 1e-3 + _COLD_US_PER_ROW * 1e-6 * len(rows):
            self._prefetch_left = _PREFETCH_GATHERS  # pages came from disk: announce the next gathers' pages
        return out

    def _csr(self, el: slice | np.ndarray, ptr: np.ndarray, spans) -> sp.csr_matrix:
        data = self._data.take(el, spans).astype(np.float32, copy=False)
        return sp.csr_matrix((data, self._indices.take(el, spans), ptr), shape=(len(ptr) - 1, self.shape[1]))

    def to_memory(self) -> sp.csr_matrix:
        return self[:]

    def _rows(self, key) -> slice | np.ndarray:
        """A row selection as a unit-step slice or an int64 array (IndexError for anything else)."""
        if isinstance(key, tuple):
            if len(key) != 2 or not (isinstance(key[1], slice) and key[1] == slice(None)):
                raise IndexError("a store's X selects rows only: X[rows] or X[rows, :]")
            key = key[0]
        n = self.shape[0]
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            return slice(a, max(a, b)) if step == 1 else np.arange(a, b, step)
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean row mask of shape {rows.shape} for {n} rows")
            return np.flatnonzero(rows)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"row indices must be integers, got {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(rows < 0, rows + n, rows)

    def elements(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row pointers [R + 1] of the gathered rows and the flat positions of their stored values."""
        start = self.indptr[rows]
        lens = self.indptr[rows + 1] - start
        ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=ptr[1:])
        return ptr, np.repeat(start - ptr[:-1], lens) + np.arange(ptr[-1])

    @classmethod
    def from_raw(cls, data_file: str | Path, indices_file: str | Path, indptr: np.ndarray,
                 shape: tuple[int, int]) -> StoreMatrix:
        """X from two raw little-endian files (float32 values, int32 column indices, in row order) and its row
        pointers."""
        nnz = int(indptr[-1])
        return cls(_Flat(str(data_file), 0, "<f4", nnz), _Flat(str(indices_file), 0, "<i4", nnz), indptr, shape)

    def block_rows(self) -> int:
        """Rows per block of about ``_BLOCK`` stored values."""
        return rows_per_block(self.nnz, self.shape[0])

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[sp.csr_matrix]:
        """X[rows] (all rows when None) as consecutive CSR blocks of about ``_BLOCK`` stored values."""
        step = self.block_rows()
        if rows is None:
            yield from (self[a : a + step] for a in range(0, self.shape[0], step))
        else:
            yield from (self[rows[a : a + step]] for a in range(0, len(rows), step))

    def values(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Stored values of ``rows`` in blocks (order not kept); a block of consecutive rows is one file slice."""
        rows, step = np.sort(np.asarray(rows, dtype=np.int64)), self.block_rows()
        for a in range(0, len(rows), step):
            r = rows[a : a + step]
            if r[-1] - r[0] + 1 == len(r):
                yield self._data.take(slice(int(self.indptr[r[0]]), int(self.indptr[r[-1] + 1])))
            else:
                yield self._data.take(self.elements(r)[1])


def rows_per_block(nnz: int, n_rows: int) -> int:
    """Rows per block of about ``_BLOCK`` stored values, for a matrix of ``nnz`` values in ``n_rows`` rows."""
    return max(1, _BLOCK // max(1, math.ceil(nnz / max(n_rows, 1))))


class CellStore:
    """An opened store: obs, var, uns in memory and X a :class:`StoreMatrix` (what training, prediction and the
    set sampler use of an AnnData); ``store[rows]`` / ``store[rows, genes]`` and ``to_memory()`` give AnnData."""

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, X: StoreMatrix,
                 groups: pd.DataFrame):
        self.path, self.obs, self.var, self.uns, self.X, self.groups = path, obs, var, uns, X, groups

    n_obs = property(lambda self: len(self.obs))
    n_vars = property(lambda self: len(self.var))
    shape = property(lambda self: (self.n_obs, self.n_vars))
    obs_names = property(lambda self: self.obs.index)
    var_names = property(lambda self: self.var.index)

    def __repr__(self) -> str:
        return f"CellStore({self.path}): {self.n_obs} cells x {self.n_vars} genes, {len(self.groups)} groups"

    def __getitem__(self, index) -> AnnData:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        sel = self.X._rows(rows)
        idx = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel
        out = AnnData(X=self.X[sel], obs=self.obs.iloc[idx].copy(), var=self.var.copy(), uns=dict(self.uns))
        return out if isinstance(cols, slice) and cols == slice(None) else out[:, cols]

    def to_memory(self) -> AnnData:
        """The whole store as an in-memory AnnData (store order)."""
        return self[:]


def is_store(path: str | Path) -> bool:
    """True for a directory holding a store marker (``store.json``)."""
    return Path(path).is_dir() and (Path(path) / MARKER).is_file()


def open_store(path: str | Path) -> CellStore:
    """Open a store directory: obs, var, uns and row pointers in memory, X lazy; DataError if it is not a store."""
    path = Path(path)
    meta = _read_marker(path)
    file = path / meta.get("file", CELLS)
    from anndata.io import read_elem

    try:
        with h5py.File(file, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            uns = read_elem(f["uns"]) if "uns" in f else {}
            g = f["X"]
            shape = tuple(int(s) for s in g.attrs["shape"])
            X = StoreMatrix(_flat(file, g["data"]), _flat(file, g["indices"]), g["indptr"][:], shape)
    except (OSError, KeyError) as e:
        raise DataError(f"{file} could not be read as a store's cells: {e}") from None
    if shape != (len(obs), len(var)) or X.nnz != X._data.size or len(X.indptr) != shape[0] + 1:
        raise DataError(f"{path}: X {shape} with {X._data.size} values does not match its row pointers or obs/var")
    return CellStore(path, obs, var, uns, X, pd.DataFrame(meta["groups"]))


def _flat(file: Path, ds: h5py.Dataset) -> _Flat:
    offset = ds.id.get_offset()
    if ds.size and (offset is None or ds.chunks is not None or ds.compression):
        raise DataError(f"{file}: X/{ds.name.rsplit('/', 1)[-1]} is not a contiguous uncompressed dataset")
    return _Flat(str(file), int(offset or 0), ds.dtype.str, int(ds.size))


def _read_marker(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DataError(f"store not found: {path}")
    if not is_store(path):
        raise DataError(f"{path} is not a perturbdiff store (no {MARKER}); write one with "
                        "`perturbdiff preprocess IN.h5ad ... --store DIR`")
    try:
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path / MARKER} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path / MARKER} is not a perturbdiff store marker (format {FORMAT!r} expected)")
    if int(meta.get("version", 0)) > VERSION:
        raise DataError(f"{path} is a store of version {meta['version']}; this perturbdiff reads version {VERSION}")
    return meta


# -- statistics without loading X --------------------------------------------------------------------------------
def nonzero_stats(X, rows: np.ndarray, q: float = 0.01) -> tuple[float, float, int]:
    """Max, ``q``-quantile (numpy's linear rule) and number of the stored values of ``rows``.

    In memory: numpy on X[rows]. A store: one pass in blocks keeping only the ⌊q(n-1)⌋ + 2 smallest values, exact.
    """
    if not getattr(X, "lazy_rows", False):
        sub = as_csr(X)[rows]
        return (float(sub.max()), float(np.quantile(sub.data, q)), int(sub.nnz)) if sub.nnz else (0.0, 0.0, 0)
    rows = np.asarray(rows, dtype=np.int64)
    n = int((X.indptr[rows + 1] - X.indptr[rows]).sum())
    if n == 0:
        return 0.0, 0.0, 0
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    k = min(lo + 2, n)
    vmax, keep, bound = -np.inf, np.zeros(0, np.float32), np.inf
    for v in X.values(rows):
        if v.size:
            vmax = max(vmax, float(v.max()))
            keep = np.concatenate([keep, v[v < bound]])  # values >= the k-th smallest so far cannot matter
            if keep.size > 2 * k:
                keep = np.partition(keep, k - 1)[:k]
                bound = float(keep[k - 1 :].max())
    keep = np.sort(keep)[:k]
    pair = np.asarray([keep[lo], keep[min(lo + 1, n - 1)]], dtype=keep.dtype)
    return vmax, float(np.quantile(pair, pos - lo)), n  # numpy's interpolation between the two order statistics


def row_mean(X, rows: np.ndarray) -> np.ndarray:
    """Mean of X over ``rows`` [G]: scipy on X[rows] in memory; a store summed in blocks (float64)."""
    if not getattr(X, "lazy_rows", False):
        return np.asarray(as_csr(X[rows]).mean(0)).ravel()
    total = np.zeros(X.shape[1])
    for blk in X.blocks(np.asarray(rows, dtype=np.int64)):
        total += np.bincount(blk.indices, weights=blk.data, minlength=X.shape[1])
    return (total / max(len(rows), 1)).astype(np.float32)
