"""The trained runs of ``real_benchmark.py`` under a work folder: ``<work>/<split>/<tag>/seed<k>/run``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def trained_runs(work: Path, tag: str, splits: str) -> Iterator[tuple[str, str, object, Path]]:
    """(split, seed folder name, the split's preprocessed AnnData, run folder) of every run with a best checkpoint,
    the AnnData read once per split."""
    import anndata as ad

    for split in splits.split(","):
        seeds = [d for d in sorted((work / split / tag).glob("seed*")) if (d / "run" / "best.safetensors").exists()]
        if not seeds:
            continue
        prep = ad.read_h5ad(work / split / "prep.h5ad")
        for seed_dir in seeds:
            yield split, seed_dir.name, prep, seed_dir / "run"
