"""``perturbdiff simulate``: write the built-in synthetic Perturb-seq-like data set (raw counts) to .h5ad."""

from __future__ import annotations

import argparse
import time

from perturbdiff._io import atomic_write
from perturbdiff.datasets import simulate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="FILE.h5ad", help="where to write the simulated AnnData")
    p.add_argument("--n-cells", type=int, default=20_000, help="number of cells")
    p.add_argument("--n-genes", type=int, default=1_000, help="number of genes")
    p.add_argument("--n-cell-types", type=int, default=4, help="number of cell types")
    p.add_argument("--n-batches", type=int, default=3, help="number of batches")
    p.add_argument("--n-perturbations", type=int, default=12, help="number of single perturbations")
    p.add_argument("--n-combos", type=int, default=4, help="number of A+B combinations")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    adata = simulate(
        args.n_cells,
        args.n_genes,
        n_cell_types=args.n_cell_types,
        n_batches=args.n_batches,
        n_perturbations=args.n_perturbations,
        n_combos=args.n_combos,
        seed=args.seed,
    )
    atomic_write(args.out, adata.write_h5ad)
    n_pert = adata.obs["perturbation"].nunique()
    zeros = 1 - adata.X.nnz / max(1, adata.n_obs * adata.n_vars)
    print(
        f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes, {n_pert} perturbation labels "
        f"(control 'control'), {zeros:.0%} zeros ({time.perf_counter() - t0:.1f} s); "
        "keys: --pert-key perturbation --control-value control --context-keys cell_type --batch-key batch "
        "--input-kind counts"
    )
    return 0
