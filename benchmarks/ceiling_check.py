"""cell-eval's data ceiling on the shared splits' test conditions: what the real cells allow each metric to reach
(disjoint halves, Spearman–Brown corrected; bounded scores only), next to which PerturbDiff and the baselines are
read.

    OMP_NUM_THREADS=1 python benchmarks/ceiling_check.py --work bench_work \\
        --out bench_work/ceiling.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

HEAD = ["pr_auc", "roc_auc", "overlap_at_N", "pearson_delta", "discrimination_score_l1", "de_direction_match"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="real_benchmark.py's folder (holds <split>/prep.h5ad)")
    ap.add_argument("--splits", default="kang_celltype,devel_gbm,devel_combo")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder of the split JSON files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    import anndata as ad

    from perturbdiff._io import atomic_write_json
    from perturbdiff.data import Split
    from perturbdiff.evaluate import build_real, context_column, data_ceiling

    out = {}
    for name in args.splits.split(","):
        split = Split.read(args.shared / f"{name}.json")
        prep = ad.read_h5ad(args.work / name / "prep.h5ad")
        real, ctx = context_column(build_real(prep, split), split.context_cols)
        ceiling = data_ceiling(real, pert_col=split.pert_col, control=split.control, context_col=ctx, seed=args.seed)
        out[name] = {k: float(v) for k, v in ceiling.dropna().items()}
        print(name, " ".join(f"{k} {out[name][k]:.3f}" for k in HEAD if k in out[name]), flush=True)
        atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
