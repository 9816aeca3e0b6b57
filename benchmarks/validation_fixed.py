"""Validation scores that compare across presets: every run's best checkpoint predicts the split's validation
conditions at the same number of cells, scored the same way.

    python benchmarks/validation_fixed.py --work bench_work --split kang_celltype --tags anchor-auto-2k,tiny-anchor-2k

The training validator (log.csv's val_ed) scores min(group, 2 × set_size) cells per condition: 64 for preset tiny,
128 for small. The energy distance is a V-statistic, biased upwards by about E‖x − x'‖ / n, so at those sizes the
bias is of the order of the differences between runs: val_ed compares runs of one preset only. Here every run
predicts ``--cells`` cells per validation condition (or the whole group if smaller) from the same control pool and
seed, and is scored against the same real cells: energy distance (log1p) and pearson_delta. Only validation
conditions are touched, so the table can choose a default. Mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare  # noqa: E402
from validation_table import fmt  # noqa: E402


def scores(run: Path, prep, split, keys, n_max: int, seed: int = 0, guidance: float | None = None) -> dict[str, float]:
    from perturbdiff import PerturbDiff
    from perturbdiff.data import as_csr, condition_codes, row_mean
    from perturbdiff.diffusion import energy_distance
    from perturbdiff.evaluate import metric

    model = PerturbDiff.load(run, adata=prep, which="best")
    code, present = condition_codes(prep, keys)
    rng = np.random.default_rng(seed)
    real, ctrl = [], []
    for ctx, pert in split.val:
        rows = np.flatnonzero(code == present.index((ctx, pert)))
        rows = np.sort(rng.choice(rows, size=min(n_max, len(rows)), replace=False))
        real.append(as_csr(prep.X[rows]).toarray())
        ctrl.append(row_mean(prep.X, np.flatnonzero(code == present.index((ctx, split.control)))))
    pred = model.predict(split.val, n_cells=[len(r) for r in real], seed=seed, progress=False,
                         include_controls=False, unknown_perturbations="generic", guidance=guidance)
    pred_code, pred_present = condition_codes(pred, keys)
    X = as_csr(pred.X).toarray()
    pearson = metric("pearson_delta").compute
    eds, rs = [], []
    for cond, r, c in zip(split.val, real, ctrl):
        p = X[pred_code == pred_present.index(cond)]
        eds.append(float(energy_distance(torch.from_numpy(p)[None], torch.from_numpy(r)[None])[0]))
        rs.append(pearson(p.mean(0), r.mean(0), c))
    return {"ed": float(np.mean(eds)), "pearson_delta": float(np.nanmean(rs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work", help="working folder of real_benchmark.py runs")
    p.add_argument("--split", required=True)
    p.add_argument("--tags", required=True, help="comma-separated tags")
    p.add_argument("--cells", type=int, default=256, help="cells per validation condition (at most its group)")
    p.add_argument("--shared", default=str(SHARED), help="the shared/ folder with data/ and benchmarks/")
    p.add_argument("--guidance", default="", help="comma-separated guidance weights w to score each run at (default: "
                   "the run's own)")
    args = p.parse_args()
    weights = [float(w) for w in args.guidance.split(",") if w.strip()] or [None]
    prep, split, keys = prepare(args.split, Path(args.work), Path(args.shared))
    print(f"| split | tag | guidance | seeds | val ED at {args.cells} cells | val pearson_delta |")
    print("|---|---|---|---|---|---|")
    for tag in args.tags.split(","):
        done = (Path(args.work) / args.split / tag).glob("seed*/result.json")  # finished runs only
        runs = sorted(r.parent / "run" for r in done)
        for w in weights:
            rows = [scores(run, prep, split, keys, args.cells, guidance=w) for run in runs]
            if rows:
                print(f"| {args.split} | {tag} | {'own' if w is None else w} | {len(rows)} | "
                      f"{fmt([r['ed'] for r in rows])} | {fmt([r['pearson_delta'] for r in rows])} |", flush=True)


if __name__ == "__main__":
    main()
