"""``perturbdiff split``: draw a reproducible train/val/test split of a preprocessed AnnData, save as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from perturbdiff._errors import DataError
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._split import STRATEGIES, make_split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="preprocessed .h5ad (output of `perturbdiff preprocess`)")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES, help="what generalisation the split tests")
    parser.add_argument(
        "--holdout",
        default=None,
        help="comma-separated held-out values: context values, perturbation labels or A+B combinations "
        "(default: drawn from --seed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.3,
        help="held-out-contexts-partial: share of held-out contexts' perturbations in train (default 0.3)",
    )
    parser.add_argument("--n-val", type=int, default=None, help="number of validation items (default: per strategy)")
    parser.add_argument("--name", default=None, help="split name written into the file (default: DATA_STRATEGY)")
    parser.add_argument("--out", required=True, help="output split JSON file")


def _describe(record: dict) -> str:
    """A short text of the preprocessing record (for the split file's `preprocess` field)."""
    steps = []
    if record.get("normalize"):
        steps.append(f"normalize_total({record['normalize'].get('target_sum', 1e4):g})")
    if record.get("log1p"):
        steps.append("log1p")
    sel = record.get("gene_selection") or {}
    genes = f"{len(record.get('genes', []))} genes ({sel.get('method', 'given')})"
    return "+".join(steps or ["as provided (log1p)"]) + f"; {genes}"


def _read(path: str):
    """Obs, var and uns of the preprocessed file (X stays on disk) and the record's DataKeys."""
    import anndata as ad

    from perturbdiff.data import get_record

    if not Path(path).exists():
        raise DataError(f"data file not found: {path}")
    adata = ad.read_h5ad(path, backed="r")
    record = get_record(adata)
    if "keys" not in record:
        raise DataError(f"the preprocessing record of {path} has no 'keys'; run perturbdiff preprocess again")
    return adata, record, DataKeys.from_dict(record["keys"])


def run(args: argparse.Namespace) -> int:
    adata, record, keys = _read(args.data)
    try:
        holdout = None if args.holdout is None else [h.strip() for h in args.holdout.split(",") if h.strip()]
        kw = {
            "holdout": holdout,
            "seed": args.seed,
            "train_fraction": args.train_fraction,
            "n_val": args.n_val,
        }
        split = make_split(adata, keys, args.strategy, **kw)
    finally:
        if adata.isbacked:
            adata.file.close()
    split.name = args.name or f"{Path(args.data).stem}_{args.strategy}"
    split.dataset, split.source, split.preprocess = Path(args.data).stem, str(args.data), _describe(record)
    split.write(args.out)
    print(split.summary())
    print(f"held out: {', '.join(split.extra.get('holdout') or [])}; wrote {args.out}")
    return 0
