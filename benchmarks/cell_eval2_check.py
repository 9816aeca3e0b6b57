"""PerturbDiff and the additive / linear baselines scored with cell-eval2 0.20.0 (``--preset``, default vcc2026).

For each trained run (``real_benchmark.py``'s folders: ``<work>/<split>/<tag>/seed<k>/run``) the best checkpoint
predicts the split's test conditions as real_benchmark does; the baselines predict them with the same seed (their
control-cell sampling). Every contender is scored per context by ``perturbdiff.evaluate._cell_eval2`` (0 = the
mean-response baseline, 1 = a split-half replicate; each context's references computed once). Writes the long
tables and a mean ± sd over seeds per split, contender and member to ``--out`` (JSON), and prints the markdown.

    OMP_NUM_THREADS=1 python benchmarks/cell_eval2_check.py --work /work/bench_work --tag flow-noise-2k \\
        --splits kang_celltype,devel_gbm --seeds 0,1,2 --out /work/bench_work/cell_eval2_flow-noise-2k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def contenders(prep, run_dir: Path, seed: int, baselines: list[str]):
    """{name: prediction} for one seed: the model's best checkpoint and each baseline; plus the model's split."""
    from perturbdiff import PerturbDiff
    from perturbdiff.baselines import make_baseline

    model = PerturbDiff.load(run_dir, adata=prep)
    split = model.split
    preds = {"perturbdiff": model.predict(subset="test", seed=seed, progress=False, unknown_perturbations="generic")}
    for name in baselines:
        preds[name] = make_baseline(name, unseen="zero").fit(prep, split, model.keys).predict(
            split.test, split.test_n_cells, seed
        )
    return preds, split


def score_split(args, split_name: str) -> pd.DataFrame:
    """The long cell-eval2 table of every (seed, contender) of one split."""
    import anndata as ad

    from perturbdiff.evaluate import build_real, context_column
    from perturbdiff.evaluate._cell_eval2 import score_cell_eval2

    prep = ad.read_h5ad(Path(args.work) / split_name / "prep.h5ad")
    refs: dict = {}  # per context: baseline and anchor depend on the real cells only
    frames = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        preds, split = contenders(prep, Path(args.work) / split_name / args.tag / f"seed{seed}" / "run", seed,
                                  args.baselines)  # fmt: skip
        real, ctx = context_column(build_real(prep, split), split.context_cols)
        t_pred = time.perf_counter() - t0
        for name, pred in preds.items():
            t0 = time.perf_counter()
            pred = context_column(pred, split.context_cols)[0]
            table = score_cell_eval2(pred, real, pert_col=split.pert_col, control=split.control, context_col=ctx,
                                     preset=args.preset, num_threads=args.num_threads, refs=refs)  # fmt: skip
            frames.append(table.assign(split=split_name, seed=seed, contender=name))
            print(f"{split_name} seed {seed} {name}: scored in {time.perf_counter() - t0:.1f} s "
                  f"(predictions {t_pred:.1f} s)", flush=True)  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of the ``level="all"`` rows: (split, contender, metric) x (mean, sd, n) of scaled
    and of the raw value."""
    rows = long[long["level"] == "all"]
    agg = rows.groupby(["split", "contender", "metric"], sort=False).agg(
        scaled_mean=("scaled", "mean"), scaled_sd=("scaled", "std"), scaled_n=("scaled", "count"),
        value_mean=("value", "mean"), value_sd=("value", "std"), baseline=("baseline", "mean"),
        replicate=("replicate", "mean"),
    )  # fmt: skip
    return agg.reset_index()


def _cell(mean: float, sd: float) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.3f}" if np.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def markdown(summary: pd.DataFrame, kind: str = "scaled") -> str:
    """One table per split: contender x member, ``kind`` = scaled or value (raw), mean ± sd over seeds."""
    out = []
    for split, block in summary.groupby("split", sort=False):
        metrics = list(pd.unique(block["metric"]))
        if kind == "value":
            metrics = [m for m in metrics if m != "mean_scaled"]
        out += [f"**{split}** ({kind})", "", "| contender | " + " | ".join(metrics) + " |",
                "|---" * (len(metrics) + 1) + "|"]  # fmt: skip
        for name, rows in block.groupby("contender", sort=False):
            by = rows.set_index("metric")
            cells = [_cell(by.at[m, f"{kind}_mean"], by.at[m, f"{kind}_sd"]) for m in metrics]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        if kind == "value":
            by = block.groupby("metric", sort=False)[["baseline", "replicate"]].first()
            for end in ("baseline", "replicate"):
                out.append(f"| *{end} end* | " + " | ".join(_cell(by.at[m, end], np.nan) for m in metrics) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/work/bench_work", help="real_benchmark.py's work folder")
    p.add_argument("--tag", default="flow-noise-2k", help="the runs' tag (folder under each split)")
    p.add_argument("--splits", default="kang_celltype,devel_gbm", help="comma-separated split names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (run folders seed<k>)")
    p.add_argument("--baselines", default="additive,linear", help="comma-separated baselines scored next to it")
    p.add_argument("--preset", default="vcc2026", help="cell-eval2 preset")
    p.add_argument("--num-threads", type=int, default=1, help="threads for cell-eval2's DE tests (pdex)")
    p.add_argument("--out", required=True, help="JSON file to write (long tables, summary, markdown)")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.baselines = [b for b in args.baselines.split(",") if b]

    from perturbdiff._io import atomic_write_json

    long = pd.concat([score_split(args, s) for s in args.splits.split(",")], ignore_index=True)
    summary = summarise(long)
    md = markdown(summary, "scaled") + "\n" + markdown(summary, "value")
    print(md)
    atomic_write_json(args.out, {
        "args": {k: v for k, v in vars(args).items()}, "summary": json.loads(summary.to_json(orient="records")),
        "long": json.loads(long.to_json(orient="records")), "markdown": md,
    })  # fmt: skip


if __name__ == "__main__":
    main()
