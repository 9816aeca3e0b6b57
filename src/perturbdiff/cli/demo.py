"""``perturbdiff demo``: the whole pipeline on built-in synthetic data, ending with an HTML report.

simulate → preprocess → split (held-out cell type with partial coverage) → train (``tiny``) → predict →
baselines → cell-eval + R² → report. Everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perturbdiff.cli import threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="perturbdiff_demo", help="output folder (default: ./perturbdiff_demo)")
    p.add_argument("--n-cells", type=int, default=8000, help="cells to simulate")
    p.add_argument("--n-genes", type=int, default=1000, help="genes to simulate")
    p.add_argument("--n-hvg", type=int, default=500, help="highly variable genes the model uses")
    p.add_argument("--preset", default="tiny", help="model size preset")
    p.add_argument("--max-steps", type=int, default=750,
                   help="training steps (750 of preset tiny: 12,000 sets of cells, 3 validations)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation, split and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    threads_argument(p)


class _Steps:
    """Numbered progress lines with elapsed time: ``[2/7] preprocess ... 1.2 s``."""

    def __init__(self, n: int):
        self.n, self.i, self.t0 = n, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.i += 1
        print(f"[{self.i}/{self.n}] {what} (t = {time.perf_counter() - self.t0:.0f} s)", flush=True)


def run(args: argparse.Namespace) -> int:
    from perturbdiff._io import atomic_write
    from perturbdiff.baselines import BASELINES
    from perturbdiff.cli.evaluate import run_baselines
    from perturbdiff.config import Config
    from perturbdiff.data import DataKeys, make_split, preprocess, register
    from perturbdiff.datasets import simulate
    from perturbdiff.evaluate import (
        build_real,
        context_column,
        evaluate_predictions,
        format_table,
        verdict_lines,
        verdict_table,
        write_report,
    )
    from perturbdiff.model import PerturbDiff

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = _Steps(7)
    step(f"simulate {args.n_cells} cells x {args.n_genes} genes (cell types, batches, hidden population shifts)")
    counts = simulate(args.n_cells, args.n_genes, seed=args.seed)
    keys = register(counts, DataKeys("perturbation", "control", ("cell_type",), "counts", batch_key="batch"))
    step("split: one cell type held out, 30 % of its perturbations seen in training")
    split = make_split(counts, keys, "held-out-contexts-partial", seed=args.seed)
    split.name = "demo"
    print(f"      {split.summary()}")
    step(f"preprocess: normalize_total -> log1p -> {args.n_hvg} HVGs of the training cells")
    adata = preprocess(counts, keys, n_hvg=args.n_hvg, split=split)  # genes of the training cells only
    atomic_write(out / "data.h5ad", adata.write_h5ad)
    split.write(out / "split.json")
    cfg = Config.from_preset(args.preset).update({"train": {"max_steps": args.max_steps, "seed": args.seed}})
    step(f"train PerturbDiff ({args.preset}, {cfg.train.max_steps} steps)")
    model = PerturbDiff.from_config(cfg, adata, split).train(out_dir=out / "run", progress=not args.no_progress,
                                                             resume=False)
    step("predict the held-out conditions")
    model = PerturbDiff.load(out / "run", adata=adata)
    pred = model.predict(progress=False, seed=args.seed)  # seconds: the training bar is the demo's one bar
    atomic_write(out / "pred.h5ad", pred.write_h5ad)
    step(f"baselines: {', '.join(BASELINES)}")
    preds = {"perturbdiff": context_column(pred, split.context_cols)[0]}
    preds.update(run_baselines(list(BASELINES), adata, split, keys, "test", args.seed))
    step("evaluate with cell-eval + R², write the report")
    real, ctx = context_column(build_real(adata, split, "test"), split.context_cols)
    kw = dict(pert_col=split.pert_col, control=split.control, context_col=ctx)
    table, per = evaluate_predictions(preds, real, **kw, outdir=out, return_per_condition=True)
    html = write_report(table, out, per_condition=per, preds=preds, real=real, **kw, model="perturbdiff",
                        baselines=list(BASELINES), title="PerturbDiff demo (synthetic data, held-out cell type)")
    print()
    print(format_table(table))
    print()
    for line in verdict_lines(verdict_table(per, "perturbdiff", list(BASELINES)), "perturbdiff"):
        print(line)
    print(f"\nreport: {html.resolve()}")
    return 0

