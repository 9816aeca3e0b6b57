"""Throughput of the cell-set loader: sets/s and cells/s for S = 256 / 32, B = 8, num_workers 0 / 2, peak RSS.

    python benchmarks/bench_sampler.py [--cells 200000] [--genes 1000] [--seconds 15]

Data: perturbdiff.datasets.simulate counts -> normalize_total(1e4) -> log1p (float32 CSR), kept in memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp

from perturbdiff.data import CellSetDataset, CellSetIndex, DataKeys, Vocab, make_loader
from perturbdiff.datasets import simulate


def log1p_data(n_cells: int, n_genes: int):
    """Simulated counts, normalised to 1e4 per cell and log1p'd, as float32 CSR (vectorised, no copy of obs)."""
    adata = simulate(n_cells, n_genes, n_perturbations=50, seed=0)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    per_row = np.repeat(1e4 / np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1.0), np.diff(X.indptr))
    X.data = np.log1p(X.data * per_row).astype(np.float32)
    adata.X = X
    return adata


def rss_mb() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its finished children (loader workers)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024, child_kb / 1024


def bench(ds: CellSetDataset, batch_sets: int, workers: int, seconds: float) -> tuple[float, float, int]:
    """Iterate the loader (restarting epochs) for about ``seconds``; return sets/s, target cells/s, batches."""
    loader = make_loader(ds, batch_sets, num_workers=workers)
    n_sets = n_batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            n_sets += len(batch["cond"])
            n_batches += 1
            if time.perf_counter() - start >= seconds:
                break
    dt = time.perf_counter() - start
    return n_sets / dt, n_sets * ds.set_size / dt, n_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000, help="number of simulated cells")
    p.add_argument("--genes", type=int, default=1000, help="number of genes")
    p.add_argument("--seconds", type=float, default=15.0, help="time per configuration")
    args = p.parse_args()
    t = time.perf_counter()
    adata = log1p_data(args.cells, args.genes)
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(f"data: {adata.n_obs} x {adata.n_vars}, {density:.1%} non-zero, built in {time.perf_counter() - t:.1f}s")
    keys = DataKeys("perturbation", "control", ("cell_type",), "log1p", batch_key="batch")
    conds = sorted({((c,), q) for c, q in zip(adata.obs["cell_type"], adata.obs["perturbation"]) if q != "control"})
    t = time.perf_counter()
    index = CellSetIndex.build(adata, keys, conds)
    vocab = Vocab.build(adata, keys, conds)
    print(f"index: {len(conds)} conditions, {index.n_units} units, built in {time.perf_counter() - t:.2f}s")
    print("| S | B | workers | sets/s | target cells/s | set_epoch (s) | peak RSS main / workers (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for S in (256, 32):
        ds = CellSetDataset(adata, index, vocab, set_size=S, seed=0, control_set_fraction=0.25)
        t = time.perf_counter()
        ds.set_epoch(1)
        t_epoch = time.perf_counter() - t
        for workers in (0, 2):
            sets_s, cells_s, _ = bench(ds, 8, workers, args.seconds)
            main_mb, child_mb = rss_mb()
            row = [
                S,
                8,
                workers,
                f"{sets_s:,.0f}",
                f"{cells_s:,.0f}",
                f"{t_epoch:.2f}",
                f"{main_mb:,.0f} / {child_mb:,.0f}",
            ]
            print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
