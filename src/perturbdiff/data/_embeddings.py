"""Frozen external perturbation embeddings (gene embeddings for CRISPR targets, molecule embeddings for drugs)
read from a file keyed by label, so perturbations never seen in training can still be represented (SPEC §2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from perturbdiff._errors import DataError


def read_embedding_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(labels, [n, E] float32) from a .npz (arrays ``labels``, ``embeddings``) or a .csv/.tsv (label, values...)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"perturbation embedding file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z or "embeddings" not in z:
                raise DataError(f"{path} must hold the arrays 'labels' and 'embeddings'")
            labels, mat = [str(x) for x in z["labels"]], np.asarray(z["embeddings"], np.float32)
    else:
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
        df = pd.read_csv(path, sep=sep, index_col=0)
        labels, mat = [str(x) for x in df.index], df.to_numpy(np.float32)
    if mat.ndim != 2 or len(labels) != mat.shape[0] or mat.shape[1] == 0:
        raise DataError(f"{path}: expected one row of numbers per label, got shape {mat.shape}")
    if not np.isfinite(mat).all():
        raise DataError(f"{path} contains NaN or infinite values")
    dup = pd.Index(labels)[pd.Index(labels).duplicated()]
    if len(dup):
        raise DataError(f"{path}: label {dup[0]!r} appears more than once")
    return labels, mat


def align_table(vocab_labels: list[str], labels: list[str], mat: np.ndarray) -> np.ndarray:
    """[len(vocab_labels), E]: each vocabulary label's row of the table, zeros where the table lacks it."""
    where = pd.Index(labels).get_indexer(vocab_labels)
    out = np.zeros((len(vocab_labels), mat.shape[1]), np.float32)
    out[where >= 0] = mat[where[where >= 0]]
    return out
