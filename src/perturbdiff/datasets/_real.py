"""Loaders for real data: any .h5ad with clear errors, and the Kang 2018 IFN-beta PBMC data set."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff._errors import DataError

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def read_h5ad(path: str | Path, backed: bool = False) -> AnnData:
    """Read an .h5ad file (``backed=True``: X stays on disk, read-only); DataError if missing or not h5ad.

    A perturbdiff store directory (``perturbdiff preprocess --store``) opens as a CellStore whose X stays on disk.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if path.is_dir():
        from perturbdiff.data import MARKER, is_store, open_store

        if is_store(path):
            return open_store(path)
        raise DataError(f"{path} is a folder, not an .h5ad file nor a perturbdiff store (no {MARKER})")
    with open(path, "rb") as fh:
        if fh.read(8) != _HDF5_MAGIC:
            raise DataError(f"{path} is not an .h5ad file (no HDF5 signature)")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:  # anndata / h5py raise many types for malformed files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} could not be read as an .h5ad file: {msg}") from e


# (column, control value, stimulated value) of the perturbation in the known layouts of the Kang 2018 data
_KANG_PERT = (("condition", "control", "stimulated"), ("stim", "CTRL", "STIM"), ("label", "ctrl", "stim"))
_KANG_CELL_TYPE = ("seurat_annotations", "cell_type")


def load_kang2018(path: str | Path) -> AnnData:
    """Kang et al. 2018 PBMCs, control vs IFN-beta (raw counts); sets obs["condition"]: control/stimulated.

    Get the file from Seurat's ``ifnb`` data set (SeuratData; cell types in ``seurat_annotations``, condition
    in ``stim``: CTRL/STIM) converted to .h5ad, or from pertpy (``pertpy.data.kang_2018()``; condition in
    ``label``: ctrl/stim, cell types in ``cell_type``). Register it with
    ``DataKeys(pert_key="condition", control_value="control", context_keys=("seurat_annotations",),
    input_kind="counts")`` (the ``kang_celltype`` benchmark split), or ``context_keys=("cell_type",)`` for the
    pertpy file.
    """
    adata = read_h5ad(path)
    obs = adata.obs
    found = next((p for p in _KANG_PERT if p[0] in obs.columns), None)
    if found is None:
        cols = ", ".join(repr(c) for c in list(obs.columns)[:20])
        raise DataError(
            f"{path}: no Kang 2018 condition column (expected 'condition', 'stim' or 'label'); obs has {cols}"
        )
    if not any(c in obs.columns for c in _KANG_CELL_TYPE):
        raise DataError(f"{path}: no Kang 2018 cell-type column (expected 'seurat_annotations' or 'cell_type')")
    col, ctrl, stim = found
    values = obs[col].astype(str)
    unknown = sorted(set(values.unique()) - {ctrl, stim})
    if unknown:
        raise DataError(f"{path}: obs column {col!r} has values {unknown[:5]} besides {ctrl!r} and {stim!r}")
    out = adata.copy()
    condition = np.where(values.to_numpy() == ctrl, "control", "stimulated")
    out.obs["condition"] = pd.Categorical(condition, categories=["control", "stimulated"])
    return out
