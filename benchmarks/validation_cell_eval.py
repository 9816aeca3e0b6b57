"""Both halves on validation conditions: every run's best checkpoint predicts the split's validation conditions
(as many cells as each has) and is scored with the test protocol (cell-eval 0.8.2, profile full, per context, plus
R²), so a choice can weigh the DE ranking as well as the mean response without touching a test condition.

    python benchmarks/validation_cell_eval.py --work bench_work --split devel_combo --tags e-def-5k,e-csf0-5k
    python benchmarks/validation_cell_eval.py --work bench_work --split devel_combo --tags e-def-5k --floors 0,0.5,1
    python benchmarks/validation_cell_eval.py --work bench_work --split devel_combo --tags e-def-5k --guidance 0,1

``--floors`` rescores each run with other zero floors (sampling only, no retraining): a generated value below
m × the lowest real non-zero level (the 1st percentile of non-zero training values) becomes 0; 0.5 is the default
(``codec.auto_zero``), 0 keeps only ``codec.zero_threshold``. The column ``zeros`` is the share of zero values in
the predicted cells over the share in the real validation cells (1 = as many zeros as the data). ``--guidance``
rescores each run at other guidance weights w (sampling only).

With one validation condition (devel_gbm, devel_combo, kang_celltype) every DE score is one condition's: read it
over seeds, and never as a test score. Discrimination ranks a condition among the others of its context, so it
means something only where a context has several validation conditions (devel_gbm_inner's A172, devel_unseen).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare, score  # noqa: E402
from validation_table import fmt  # noqa: E402

COLUMNS = ("pr_auc", "roc_auc", "overlap_at_N", "pearson_delta", "r2", "discrimination_score_l1",
           "discrimination_score_l2", "discrimination_score_cosine", "de_nsig_counts_pred", "de_nsig_counts_real")


def zero_share(X) -> float:
    """Share of zero values of a cells × genes matrix (dense or sparse)."""
    n = X.shape[0] * X.shape[1]
    nnz = X.nnz if hasattr(X, "nnz") else int(np.count_nonzero(X))
    return 1.0 - nnz / n


def run_scores(run: Path, prep, split, seed: int, floors: list[float | None], weights: list[float | None],
               real_zeros: float) -> list[dict[str, float]]:
    """One row per (floor, guidance weight) (None: the run's own) for the run folder ``run``; ``real_zeros``: the
    zero share of the real validation cells."""
    from perturbdiff import PerturbDiff

    model = PerturbDiff.load(run, adata=prep, which="best")
    own = model.codec
    rows = []
    for m, w in product(floors, weights):
        if m is not None:  # the floor is m × zero_level; auto_zero's is 0.5 × zero_level
            model.set_codec(replace(own, auto_zero=m > 0, zero_level=own.zero_level * m / 0.5))
        pred = model.predict(subset="val", seed=seed, progress=False, unknown_perturbations="generic", guidance=w)
        model.set_codec(own)
        table, _ = score({"perturbdiff": pred}, prep, split, subset="val")
        row = {k: float(table.loc["perturbdiff"].get(k, np.nan)) for k in COLUMNS}
        gen = pred[pred.obs[split.pert_col] != split.control]
        row["zeros"] = zero_share(gen.X) / real_zeros if real_zeros > 0 else np.nan
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work", help="working folder of real_benchmark.py runs")
    p.add_argument("--split", required=True)
    p.add_argument("--tags", required=True, help="comma-separated tags")
    p.add_argument("--floors", default="", help="comma-separated zero-floor multipliers m to rescore each run at "
                   "(default: the run's own)")
    p.add_argument("--guidance", default="", help="comma-separated guidance weights w to rescore each run at "
                   "(default: the run's own)")
    p.add_argument("--shared", default=str(SHARED), help="the shared/ folder with data/ and benchmarks/")
    args = p.parse_args()
    floors = [float(m) for m in args.floors.split(",") if m.strip()] or [None]
    weights = [float(w) for w in args.guidance.split(",") if w.strip()] or [None]
    prep, split, _ = prepare(args.split, Path(args.work), Path(args.shared))
    from perturbdiff.evaluate import build_real

    real = build_real(prep, split, "val")
    real_zeros = zero_share(real[real.obs[split.pert_col] != split.control].X)
    head = ["split", "tag", "floor", "guidance", "seeds", *COLUMNS, "zeros"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for tag in args.tags.split(","):
        done = sorted((Path(args.work) / args.split / tag).glob("seed*/result.json"))  # finished runs only
        if not done:
            continue
        per_run = [run_scores(r.parent / "run", prep, split, int(r.parent.name[4:]), floors, weights, real_zeros)
                   for r in done]
        for i, (m, w) in enumerate(product(floors, weights)):
            cells = [fmt([rows[i][k] for rows in per_run]) for k in (*COLUMNS, "zeros")]
            own = ["own" if v is None else str(v) for v in (m, w)]
            print(f"| {args.split} | {tag} | {own[0]} | {own[1]} | {len(done)} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
