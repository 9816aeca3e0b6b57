"""``perturbdiff evaluate PRED.h5ad [...] --data DATA.h5ad --split SPLIT.json --out DIR``.

Builds the real side from the data and the split, fits the chosen baselines on the fly, scores every contender
with cell-eval + R², writes per_condition.csv, aggregate.csv, figures/ and report.html, and prints a short table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import logger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preds", nargs="*", metavar="PRED.h5ad", help="predicted cells (log1p), one file per model")
    parser.add_argument("--data", required=True, help="the `perturbdiff preprocess` output the split refers to")
    parser.add_argument("--split", required=True, help="split JSON (train/val/test conditions)")
    parser.add_argument("--subset", default="test", choices=["test", "val"], help="which conditions to score")
    parser.add_argument(
        "--baselines", default="all", help="baselines to fit and score next to the model: all, none or a,b,..."
    )
    parser.add_argument("--names", default=None, help="comma-separated names of the PRED files (default: stems)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the baselines' control-cell sampling")
    parser.add_argument("--num-threads", type=int, default=2, help="threads for cell-eval's DE tests")
    parser.add_argument("--profile", default="full", help="cell-eval metric profile (full, minimal, de, ...)")
    parser.add_argument("--out", required=True, help="output folder for CSVs, figures and report.html")


def load_inputs(data_path: str, split_path: str):
    """(adata restricted to the split's genes, split, keys from the preprocessing record)."""
    import anndata as ad

    from perturbdiff.data import DataKeys, Split, get_record

    split = Split.read(split_path)
    if not Path(data_path).exists():
        raise DataError(f"data file not found: {data_path}")
    adata = ad.read_h5ad(data_path)
    keys = DataKeys.from_dict(get_record(adata)["keys"])
    if split.var_names is not None and list(adata.var_names) != list(split.var_names):
        missing = [g for g in split.var_names if g not in set(adata.var_names)]
        if missing:
            raise DataError(f"{len(missing)} gene(s) of the split are not in {data_path}, e.g. {missing[0]!r}")
        adata = adata[:, split.var_names].copy()
    return adata, split, keys


def baseline_names(spec: str) -> list[str]:
    from perturbdiff.baselines import BASELINES

    if spec in ("all", ""):
        return list(BASELINES)
    if spec == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}, all or none")
    return names


def n_cells_for(split, subset: str) -> list[int] | None:
    return split.test_n_cells if subset == "test" else None


def run_baselines(names: list[str], adata, split, keys, subset: str, seed: int) -> dict:
    """Fit and predict each baseline (perturbations with no trained part: no effect, as in PEERS.md);
    one that still cannot predict a condition is skipped with a notice."""
    from perturbdiff.baselines import make_baseline

    out = {}
    for name in names:
        start = time.perf_counter()
        try:
            model = make_baseline(name, unseen="zero").fit(adata, split, keys)
            out[name] = model.predict(split.subset(subset), n_cells_for(split, subset), seed)
        except DataError as e:
            logger.warning(f"baseline {name} skipped: {e}")
            continue
        logger.info(f"baseline {name}: fit + predict {time.perf_counter() - start:.2f} s")
    return out


def _read_preds(paths: list[str], names: str | None, taken: list[str]) -> dict:
    import anndata as ad

    labels = [n.strip() for n in names.split(",")] if names else [Path(p).stem for p in paths]
    if len(labels) != len(paths):
        raise ConfigError(f"--names has {len(labels)} names for {len(paths)} prediction files")
    clash = [n for n in labels if n in taken] or [n for n in labels if labels.count(n) > 1]
    if clash:
        raise ConfigError(f"contender name {clash[0]!r} is used twice (baselines: {', '.join(taken)}); use --names")
    preds = {}
    for label, path in zip(labels, paths):
        if not Path(path).exists():
            raise DataError(f"prediction file not found: {path}")
        preds[label] = ad.read_h5ad(path)
    return preds


def run(args: argparse.Namespace) -> int:
    from perturbdiff.evaluate import (
        build_real,
        context_column,
        evaluate_predictions,
        format_table,
        headline,
        verdict_lines,
        verdict_table,
        write_report,
    )

    adata, split, keys = load_inputs(args.data, args.split)
    base = baseline_names(args.baselines)
    user = _read_preds(args.preds, args.names, base)
    if not user and not base:
        raise ConfigError("nothing to evaluate: give PRED.h5ad files or --baselines")
    real, ctx_col = context_column(build_real(adata, split, args.subset), split.context_cols)
    preds = {name: context_column(p, split.context_cols)[0] for name, p in user.items()}
    preds.update(run_baselines(base, adata, split, keys, args.subset, args.seed))
    start = time.perf_counter()
    table, per = evaluate_predictions(
        preds, real, pert_col=split.pert_col, control=split.control, context_col=ctx_col,
        num_threads=args.num_threads, profile=args.profile, outdir=args.out, return_per_condition=True,
    )  # fmt: skip
    logger.info(f"cell-eval + R² for {len(preds)} contender(s): {time.perf_counter() - start:.1f} s")
    html = write_report(
        table, args.out, per_condition=per, preds=preds, real=real, pert_col=split.pert_col,
        control=split.control, context_col=ctx_col, model=next(iter(user), None), baselines=base,
        title=f"PerturbDiff evaluation: {split.name or Path(args.split).stem} ({args.subset})",
    )  # fmt: skip
    print(format_table(table))
    model = next(iter(user), None)
    if model is not None and base:
        for line in verdict_lines(verdict_table(per, model, base, headline()), model):
            print(line)
    print(f"report: {html}")
    return 0
