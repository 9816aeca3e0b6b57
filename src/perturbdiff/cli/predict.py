"""``perturbdiff predict``: generate predicted cells for a split's conditions with a trained run."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of `perturbdiff train` (or a .safetensors checkpoint)")
    p.add_argument("--data", required=True, help="preprocessed .h5ad holding the control cells")
    p.add_argument("--split", help="split JSON (default: the split saved with the run)")
    p.add_argument("--subset", default="test", choices=["test", "val", "train"], help="which conditions to predict")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of the run")
    p.add_argument("--n-cells", type=int, help="cells per condition (default: as many as the real condition)")
    p.add_argument("--n-samples", type=int, default=1, help="independent response distributions per condition")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w (default: the run's, 0)")
    p.add_argument("--steps", type=int, help="DDIM steps for --start full (default: the run's)")
    p.add_argument("--start", choices=["full", "truncated"], help="sampler start (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-controls", action="store_true", help="write predicted cells only (no real control cells)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .h5ad (log1p, the layout cell-eval reads)")


def run(args: argparse.Namespace) -> int:
    from perturbdiff import PerturbDiff
    from perturbdiff._io import atomic_write
    from perturbdiff.data import Split
    from perturbdiff.datasets import read_h5ad

    adata = read_h5ad(args.data)
    model = PerturbDiff.load(args.run, adata=adata, which=args.checkpoint)
    if args.split:
        model.split = Split.read(args.split)
    pred = model.predict(subset=args.subset, n_cells=args.n_cells, n_samples=args.n_samples,
                         guidance=args.guidance, steps=args.steps, start=args.start, seed=args.seed,
                         include_controls=not args.no_controls, progress=not args.no_progress,
                         device=args.device)
    atomic_write(args.out, pred.write_h5ad)
    n_pred = int(pred.obs["predicted"].sum())
    print(f"wrote {args.out}: {n_pred} predicted cells, {pred.n_obs - n_pred} control cells, {pred.n_vars} genes")
    return 0
