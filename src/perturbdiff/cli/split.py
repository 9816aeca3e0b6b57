"""``perturbdiff split``: draw a reproducible train/val/test split of a preprocessed AnnData, save as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from perturbdiff._errors import ConfigError, DataError
from perturbdiff.data import STRATEGIES, DataKeys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="the raw .h5ad (only obs is read; choose genes afterwards with `perturbdiff "
                                     "preprocess --split`, on the training cells) or a preprocessed one")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES, help="what generalisation the split tests")
    parser.add_argument(
        "--holdout",
        default=None,
        help="comma-separated held-out values: context values, perturbation labels or A+B combinations "
        "(default: drawn from --seed)",
    )
    parser.add_argument("--pert-key", help="obs column of perturbation labels (raw files; a preprocessed file "
                                           "records it)")
    parser.add_argument("--control-value", help="label of control cells in --pert-key (raw files)")
    parser.add_argument("--context-keys", metavar="COL[,COL]", help="obs column(s) of the context (raw files)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.3,
        help="held-out-contexts-partial: share of held-out contexts' perturbations in train",
    )
    parser.add_argument("--n-val", type=int, default=None, help="number of validation items (default: per strategy)")
    parser.add_argument("--name", default=None, help="split name written into the file (default: DATA_STRATEGY)")
    parser.add_argument("--out", required=True, help="output split JSON file")


def _describe(record: dict | None) -> str:
    """A short text of the preprocessing record (for the split file's `preprocess` field)."""
    if record is None:
        return "raw: not preprocessed when the split was drawn (genes are chosen on its training cells)"
    steps = []
    if record.get("normalize"):
        steps.append(f"normalize_total({record['normalize'].get('target_sum', 1e4):g})")
    if record.get("log1p"):
        steps.append("log1p")
    sel = record.get("gene_selection") or {}
    genes = f"{len(record.get('genes', []))} genes ({sel.get('method', 'given')})"
    return "+".join(steps or ["as provided (log1p)"]) + f"; {genes}"


def _flag_keys(args: argparse.Namespace) -> dict | None:
    given = {"--pert-key": args.pert_key, "--control-value": args.control_value, "--context-keys": args.context_keys}
    if not any(given.values()):
        return None
    missing = [f for f, v in given.items() if not v]
    if missing:
        raise ConfigError(f"{', '.join(given)} go together: also pass {', '.join(missing)}")
    contexts = tuple(c.strip() for c in args.context_keys.split(",") if c.strip())
    return {"pert_key": args.pert_key, "control_value": args.control_value, "context_keys": contexts}


def _read(path: str, args: argparse.Namespace):
    """Obs of the file (X stays on disk), its record (None for a raw file) and the DataKeys of the split."""
    import anndata as ad

    from perturbdiff.data import get_record

    if not Path(path).exists():
        raise DataError(f"data file not found: {path}")
    flags = _flag_keys(args)
    adata = ad.read_h5ad(path, backed="r")
    try:
        try:
            record = get_record(adata)
        except DataError:
            record = None
        if record is None and flags is None:
            raise ConfigError(f"{path} has no preprocessing record: name its columns with --pert-key, "
                              "--control-value and --context-keys")
        if record is not None and "keys" not in record:
            raise DataError(f"the preprocessing record of {path} has no 'keys'; run perturbdiff preprocess again")
        rec = DataKeys.from_dict(record["keys"]) if record is not None else None
        if flags is None:
            return adata, record, rec
        keys = DataKeys(flags["pert_key"], flags["control_value"], flags["context_keys"], "log1p")
        if rec is not None and (rec.pert_key, rec.control_value, tuple(rec.context_keys)) != (
                keys.pert_key, keys.control_value, tuple(keys.context_keys)):
            raise ConfigError(f"--pert-key/--control-value/--context-keys differ from the record of {path} "
                              f"({rec.pert_key}, {rec.control_value}, {','.join(rec.context_keys)})")
        return adata, record, keys
    except BaseException:
        adata.file.close()
        raise


def run(args: argparse.Namespace) -> int:
    from perturbdiff.data import check_obs, make_split

    adata, record, keys = _read(args.data, args)
    try:
        check_obs(adata.obs, keys)
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
    if record is not None and (record.get("gene_selection") or {}).get("method") == "hvg":
        print(f"note: the genes of {args.data} were chosen before this split existed; for genes chosen on its "
              "training cells only, preprocess the raw file with --split " + str(args.out))
    return 0
