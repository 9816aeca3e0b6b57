"""``perturbdiff evaluate PRED.h5ad [...] --data DATA.h5ad --split SPLIT.json --out DIR``.

Builds the real side from the data and the split, fits the chosen baselines on the fly, scores every contender
with cell-eval + R², writes per_condition.csv, aggregate.csv, figures/ and report.html, and prints a short table.
With ``--scorer cell-eval2`` it scores them with cell-eval2's preset instead and writes cell_eval2.csv (long) and
cell_eval2_summary.csv (contender x scaled member).
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
    parser.add_argument(
        "--scorer", default="cell-eval", choices=["cell-eval", "cell-eval2"],
        help="cell-eval (0.8.2, the reference: tables, figures, report.html) or cell-eval2 (0.20.0, optional: its "
        "preset's members on a 0 = mean-response baseline, 1 = replicate scale; needs perturbdiff[eval2])",
    )  # fmt: skip
    parser.add_argument(
        "--preset", default=None, help="cell-eval2 preset (default vcc2026); only with --scorer cell-eval2"
    )
    parser.add_argument("--ceiling", action="store_true",
                        help="also score cell-eval's data ceiling (disjoint halves of the real cells, Spearman-Brown "
                             "corrected): what the data allows, a row of the tables and the report (about doubles "
                             "the DE time)")
    parser.add_argument("--debiased", metavar="PRED.debiased.h5ad",
                        help="`perturbdiff predict --debias`'s pseudobulks: the report shows their intervals against "
                             "the real responses and their coverage")
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


def check_scorer(args: argparse.Namespace) -> None:
    """--preset belongs to cell-eval2; cell-eval2 and the preset are checked before any work."""
    if args.scorer == "cell-eval2":
        from perturbdiff.evaluate import check_cell_eval2

        args.preset = args.preset or "vcc2026"
        check_cell_eval2(args.preset)
    elif args.preset is not None:
        raise ConfigError("--preset applies only to --scorer cell-eval2")


def run_cell_eval2(preds: dict, real, split, ctx_col: str, args: argparse.Namespace) -> int:
    """Every contender through cell-eval2 (shared real-side references); cell_eval2.csv + cell_eval2_summary.csv."""
    import pandas as pd

    from perturbdiff._io import atomic_write_text
    from perturbdiff.evaluate import format_summary, score_cell_eval2, summary_table

    refs: dict = {}
    frames = []
    for name, pred in preds.items():
        start = time.perf_counter()
        frame = score_cell_eval2(pred, real, pert_col=split.pert_col, control=split.control, context_col=ctx_col,
                                 preset=args.preset, num_threads=args.num_threads, refs=refs)  # fmt: skip
        frames.append(frame.assign(contender=name))
        logger.info(f"cell-eval2 ({args.preset}) scored {name} in {time.perf_counter() - start:.1f} s")
    long = pd.concat(frames, ignore_index=True)
    long = long[["contender", *[c for c in long.columns if c != "contender"]]]
    table = summary_table(long)
    out = Path(args.out)
    atomic_write_text(out / "cell_eval2.csv", long.to_csv(index=False))
    atomic_write_text(out / "cell_eval2_summary.csv", table.to_csv())
    print(f"cell-eval2 {args.preset}: 0 = mean-response baseline, 1 = replicate of the measurement")
    print(format_summary(table))
    print(f"tables: {out / 'cell_eval2.csv'}")
    return 0


def run(args: argparse.Namespace) -> int:
    import anndata as ad

    from perturbdiff._io import atomic_write_text
    from perturbdiff.evaluate import (
        build_real,
        context_column,
        evaluate_predictions,
        format_table,
        verdict_lines,
        verdict_table,
        with_ceiling,
        write_report,
    )

    check_scorer(args)
    if args.debiased and not Path(args.debiased).exists():
        raise DataError(f"--debiased file not found: {args.debiased}")
    if args.ceiling and args.scorer != "cell-eval":
        raise ConfigError("--ceiling is cell-eval's (cell-eval2 reports its own replicate end)")
    adata, split, keys = load_inputs(args.data, args.split)
    base = baseline_names(args.baselines)
    user = _read_preds(args.preds, args.names, base)
    if not user and not base:
        raise ConfigError("nothing to evaluate: give PRED.h5ad files or --baselines")
    real, ctx_col = context_column(build_real(adata, split, args.subset), split.context_cols)
    preds = {name: context_column(p, split.context_cols)[0] for name, p in user.items()}
    preds.update(run_baselines(base, adata, split, keys, args.subset, args.seed))
    if args.scorer == "cell-eval2":
        return run_cell_eval2(preds, real, split, ctx_col, args)
    start = time.perf_counter()
    table, per = evaluate_predictions(
        preds, real, pert_col=split.pert_col, control=split.control, context_col=ctx_col,
        num_threads=args.num_threads, profile=args.profile, outdir=args.out, return_per_condition=True,
    )  # fmt: skip
    logger.info(f"cell-eval + R² for {len(preds)} contender(s): {time.perf_counter() - start:.1f} s")
    if args.ceiling:
        table = with_ceiling(table, real, pert_col=split.pert_col, control=split.control, context_col=ctx_col,
                             num_threads=args.num_threads, profile=args.profile)
        atomic_write_text(Path(args.out) / "aggregate.csv", table.to_csv())
    html = write_report(
        table, args.out, per_condition=per, preds=preds, real=real, pert_col=split.pert_col,
        control=split.control, context_col=ctx_col, model=next(iter(user), None), baselines=base,
        title=f"PerturbDiff evaluation: {split.name or Path(args.split).stem} ({args.subset})",
        debiased=ad.read_h5ad(args.debiased) if args.debiased else None,
    )  # fmt: skip
    print(format_table(table))
    model = next(iter(user), None)
    if model is not None and base:
        for line in verdict_lines(verdict_table(per, model, base), model):
            print(line)
    print(f"report: {html}")
    return 0
