"""Register an AnnData: check keys, genes and the scale of X at once (scvi-tools setup_anndata style)."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff.data._keys import INPUT_KINDS, DataKeys

_CHUNK = 1 << 24  # values per block when scanning X (bounds temporary memory)
_LOG1P_MAX = 30.0  # log1p of normalised counts never comes near this (log1p(1e6) ≈ 13.8)


def register(adata: AnnData, keys: DataKeys) -> DataKeys:
    """Check ``adata`` against ``keys`` (columns, control value, genes, scale of X); raise or warn."""
    check_input_kind(keys.input_kind)
    check_obs(adata.obs, keys)
    check_genes(adata.var_names)
    check_values(adata.X, keys.input_kind)
    _warn_groups(adata.obs, keys)
    return keys


def check_obs(obs: pd.DataFrame, keys: DataKeys) -> None:
    """The cells' annotations alone (no X): cells present, key columns complete, the control value present (else
    the closest values are named)."""
    if len(obs) == 0:
        raise DataError("the data hold no cells (0 rows in obs)")
    for col, role in _roles(keys):
        _check_column(obs, col, role)
    pert = as_str_categorical(obs[keys.pert_key])
    values = [str(c) for c in pert.categories]
    if keys.control_value not in set(values):
        close = difflib.get_close_matches(keys.control_value, values, n=3, cutoff=0.5)
        close += [v for v in values if keys.control_value.lower() in v.lower() and v not in close][:3]
        hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                else f"its values include {', '.join(repr(c) for c in values[:8])}")
        raise DataError(f"control value {keys.control_value!r} not found in obs column {keys.pert_key!r}; {hint}")


def duplicate_names(index: pd.Index) -> int:
    """Number of cell names that repeat an earlier one."""
    return int(pd.Index(index).duplicated().sum())


def check_input_kind(kind: str) -> None:
    if kind not in INPUT_KINDS:
        raise DataError(f"input_kind must be 'counts' or 'log1p', got {kind!r}")


def check_genes(var_names: pd.Index) -> None:
    """Gene names must be unique: genes are aligned by name everywhere."""
    dup = pd.Index(var_names)[pd.Index(var_names).duplicated()].unique()
    if len(dup):
        shown = ", ".join(repr(str(g)) for g in dup[:10])
        raise DataError(
            f"duplicate gene names in var_names: {shown} ({len(dup)} duplicated); "
            "make them unique (adata.var_names_make_unique())"
        )


def as_str_categorical(values: pd.Series) -> pd.Categorical:
    """The column as a categorical of strings (category codes reused when the string names stay unique)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = values.cat.categories.astype(str)
        if cats.is_unique:
            return pd.Categorical.from_codes(values.cat.codes.to_numpy(), categories=cats).remove_unused_categories()
    return pd.Categorical(values.astype(str).to_numpy())


@dataclass
class _Stats:
    n_nan: int = 0
    n_inf: int = 0
    n_neg: int = 0
    n_nonint: int = 0
    nonint_example: float = 0.0
    min: float = 0.0
    max: float = 0.0
    n: int = 0

    def add(self, v: np.ndarray) -> None:
        if v.size == 0:
            return
        self.n += v.size
        if np.issubdtype(v.dtype, np.floating):
            finite = np.isfinite(v)
            fin = v
            if not finite.all():
                self.n_nan += int(np.isnan(v).sum())
                self.n_inf += int((~finite).sum()) - int(np.isnan(v).sum())
                fin = v[finite]
            frac = fin != np.rint(fin)
            if frac.any():
                self.n_nonint += int(frac.sum())
                self.nonint_example = float(fin[frac][0])
        else:
            fin = v
        if fin.size:
            self.n_neg += int((fin < 0).sum())
            self.min = min(self.min, float(fin.min()))
            self.max = max(self.max, float(fin.max()))


def _blocks(X) -> Iterator[np.ndarray]:
    """Stored values of X in bounded blocks: sparse ``.data``, or row blocks of dense/backed arrays."""
    if sp.issparse(X):
        for a in range(0, X.data.size, _CHUNK):
            yield X.data[a : a + _CHUNK]
        return
    rows = max(1, _CHUNK // max(1, X.shape[1]))
    for a in range(0, X.shape[0], rows):
        blk = X[a : a + rows]
        yield blk.data if sp.issparse(blk) else np.asarray(blk).ravel()


def value_stats(X) -> _Stats:
    """One full pass over X counting NaN / inf / negative / non-integer values and the range."""
    stats = _Stats()
    for block in _blocks(X):
        stats.add(block)
    return stats


def check_values(X, input_kind: str) -> None:
    """X finite and non-negative; counts are integers; log1p is small and does not look like counts."""
    check_input_kind(input_kind)
    s = value_stats(X)
    if s.n_nan or s.n_inf:
        raise DataError(f"X contains {s.n_nan} NaN and {s.n_inf} infinite values; remove or fix them first")
    if s.n_neg:
        raise DataError(
            f"X contains {s.n_neg} negative values (min {s.min:.4g}); {input_kind} data must be non-negative "
            "(scaled or centred data cannot be used)"
        )
    if input_kind == "counts" and s.n_nonint:
        raise DataError(
            f"input_kind 'counts' but X holds {s.n_nonint} non-integer values (e.g. {s.nonint_example:.4g}); "
            "pass raw counts or declare input_kind 'log1p'"
        )
    if input_kind == "log1p" and s.n_nonint == 0 and s.max >= 2:
        raise DataError(
            f"input_kind 'log1p' but X looks like raw counts (whole numbers up to {s.max:.0f}); "
            "declare input_kind 'counts'"
        )
    if input_kind == "log1p" and s.max > _LOG1P_MAX:
        raise DataError(
            f"input_kind 'log1p' but X has values up to {s.max:.4g}, too large for log1p data "
            f"(expected < {_LOG1P_MAX:g}); pass log1p(normalised counts) or declare input_kind 'counts'"
        )


def _roles(keys: DataKeys) -> list[tuple[str, str]]:
    roles = [(keys.pert_key, "pert_key")] + [(c, "context_keys") for c in keys.context_keys]
    roles += [(c, r) for c, r in ((keys.batch_key, "batch_key"), (keys.dose_key, "dose_key")) if c is not None]
    return roles


def _check_column(obs: pd.DataFrame, col: str, role: str) -> None:
    if col not in obs.columns:
        shown = ", ".join(repr(c) for c in list(obs.columns)[:20])
        raise DataError(f"obs column {col!r} ({role}) not found; available columns: {shown or 'none'}")
    n_na = int(obs[col].isna().sum())
    if n_na:
        raise DataError(f"obs column {col!r} ({role}) has {n_na} missing values (NaN); fill or drop those cells")


def _group_frame(obs: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: as_str_categorical(obs[c]) for c in dict.fromkeys(cols)}, index=None)


def _label(values: tuple) -> str:
    return "(" + ", ".join(str(v) for v in values) + ")"


def _warn_groups(obs: pd.DataFrame, keys: DataKeys) -> None:
    """Warn for contexts (x batch) without control cells and for conditions with fewer than 2 cells."""
    ctx = list(dict.fromkeys([*keys.context_keys, *([keys.batch_key] if keys.batch_key else [])]))
    df = _group_frame(obs, ctx + [keys.pert_key])
    df["_ctrl"] = (df[keys.pert_key] == keys.control_value).to_numpy()
    has_ctrl = df.groupby(ctx, observed=True, sort=True)["_ctrl"].any()
    missing = [k if isinstance(k, tuple) else (k,) for k in has_ctrl.index[~has_ctrl.to_numpy()]]
    if missing:
        shown = ", ".join(_label(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        fallback = (
            "control sets for them fall back to the same batch with another cell type, then the same "
            "cell type in another batch"
            if keys.batch_key
            else "control sets for them fall back to control cells of other contexts"
        )
        warnings.warn(
            f"{len(missing)} context(s) of {tuple(ctx)} have no {keys.control_value!r} cells: {shown}; {fallback}",
            stacklevel=3,
        )
    cond = list(keys.context_keys) + [keys.pert_key]
    sizes = df.groupby(cond, observed=True, sort=True).size()
    small = [k if isinstance(k, tuple) else (k,) for k in sizes.index[sizes.to_numpy() < 2]]
    if small:
        shown = ", ".join(_label(k) for k in small[:5]) + (" ..." if len(small) > 5 else "")
        warnings.warn(
            f"{len(small)} condition(s) {tuple(cond)} have fewer than 2 cells: {shown}; "
            "their sets are copies of one cell",
            stacklevel=3,
        )
