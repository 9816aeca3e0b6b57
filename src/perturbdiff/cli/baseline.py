"""``perturbdiff baseline NAME DATA.h5ad --split SPLIT.json --out PRED.h5ad``: fit a baseline, write its cells."""

from __future__ import annotations

import argparse
import time

from perturbdiff._io import atomic_write
from perturbdiff._logging import logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from perturbdiff.baselines import BASELINES

    parser.add_argument("name", choices=list(BASELINES), help="which baseline")
    parser.add_argument("data", metavar="DATA.h5ad", help="the `perturbdiff preprocess` output")
    parser.add_argument("--split", required=True, help="split JSON (train/val/test conditions)")
    parser.add_argument("--subset", default="test", choices=["test", "val"], help="which conditions to predict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the control-cell sampling")
    parser.add_argument("--variant", default="overall", help="mean baseline: overall, context or batch")
    parser.add_argument("--alpha", type=float, default=1.0, help="linear baseline: ridge penalty")
    parser.add_argument(
        "--unseen", default="error", choices=["error", "zero"],
        help="a perturbation none of whose parts was trained: fail, or predict no effect",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="PRED.h5ad", help="where to write the predicted cells")


def run(args: argparse.Namespace) -> int:
    from perturbdiff.baselines import make_baseline
    from perturbdiff.cli.evaluate import load_inputs, n_cells_for

    adata, split, keys = load_inputs(args.data, args.split)
    kwargs = {"mean": {"variant": args.variant}, "linear": {"alpha": args.alpha}}.get(args.name, {})
    kwargs["unseen"] = args.unseen
    start = time.perf_counter()
    model = make_baseline(args.name, **kwargs).fit(adata, split, keys)
    pred = model.predict(split.subset(args.subset), n_cells_for(split, args.subset), args.seed)
    logger.info(f"{args.name}: {pred.n_obs} cells for {len(split.subset(args.subset))} conditions "
                f"in {time.perf_counter() - start:.2f} s")  # fmt: skip
    atomic_write(args.out, lambda tmp: pred.write_h5ad(tmp))
    print(f"wrote {args.out}")
    return 0
