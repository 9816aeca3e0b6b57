"""Response families, measured: does the spread between K sampled populations of one condition match the spread
between real replicates?

For each trained run (``<work>/<split>/<tag>/seed<k>/run``) the best checkpoint predicts the split's test conditions
``--n-samples`` times (K populations of the real condition's size each). Per condition and gene: the variance across
the K predicted pseudobulks, next to the variance between real replicates of the same size. The shared files record
no donors or plates for the held-out conditions, so the real replicates are K random equal parts of the real cells
(``--replicates split``, disjoint, each 1/K of the cells, variance scaled by 1/K to the full size) or K bootstrap
resamples at the full size (``--replicates bootstrap``, the default, as the report's spread figure): both measure the
finite-sampling part only. Reported: the median over expressed genes (real mean > 0.05) and conditions of
predicted / real variance (the target 0.5–2 of the issue), per split and seed, and the ratio that K independent
draws of the predicted cells would give (predicted cell variance / n over the real replicate variance): equal
ratios mean the K populations differ by finite sampling only.

    OMP_NUM_THREADS=1 python benchmarks/families_check.py --work bench_work --tag flow-noise-2k \\
        --splits kang_celltype,devel_gbm --n-samples 5 --out bench_work/families_flow-noise-2k.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EXPRESSED = 0.05  # real mean log1p above which a gene counts as expressed


def ratios(pred, prep, keys, conditions, *, n_samples: int, mode: str, seed: int = 0) -> list[dict]:
    from perturbdiff.data import as_csr
    from perturbdiff.model._debias import codes_of

    rng = np.random.default_rng(seed)
    rows = []
    is_pred = pred.obs["predicted"].to_numpy(bool)
    sample = pred.obs["sample"].to_numpy(np.int64)
    for cond in conditions:
        in_pred = (codes_of(pred, keys, [cond]) == 0) & is_pred
        pbs = np.stack([np.asarray(as_csr(pred.X[in_pred & (sample == k)]).mean(0)).ravel()
                        for k in range(n_samples)])
        cells = as_csr(prep.X[np.flatnonzero(codes_of(prep, keys, [cond]) == 0)]).toarray()
        if mode == "split":
            parts = np.array_split(rng.permutation(len(cells)), n_samples)
            real_var = np.stack([cells[p].mean(0) for p in parts]).var(0, ddof=1) / n_samples
        else:
            real_var = np.stack([cells[rng.integers(0, len(cells), len(cells))].mean(0)
                                 for _ in range(n_samples)]).var(0, ddof=1)
        expressed = (cells.mean(0) > EXPRESSED) & (real_var > 0)
        r = pbs.var(0, ddof=1)[expressed] / real_var[expressed]
        # the part of the ratio that the model's cell-to-cell spread explains: K independent draws of n cells with
        # the predicted cells' variance would give this ratio with no family variation at all
        generated = as_csr(pred.X[in_pred & (sample == 0)]).toarray()
        iid = (generated.var(0, ddof=1) / len(generated))[expressed] / real_var[expressed]
        rows.append({"condition": "/".join([*cond[0], cond[1]]), "n_genes": int(expressed.sum()),
                     "median_ratio": float(np.median(r)), "q25": float(np.quantile(r, 0.25)),
                     "q75": float(np.quantile(r, 0.75)), "median_iid_ratio": float(np.median(iid))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--splits", default="kang_celltype,devel_gbm,devel_combo")
    ap.add_argument("--n-samples", type=int, default=5)
    ap.add_argument("--replicates", choices=["bootstrap", "split"], default="bootstrap")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from _runs import trained_runs
    from perturbdiff import PerturbDiff
    from perturbdiff._io import atomic_write_json

    results = {}
    for split, seed, prep, run in trained_runs(args.work, args.tag, args.splits):
        model = PerturbDiff.load(run, adata=prep)
        pred = model.predict(subset="test", n_samples=args.n_samples, progress=False, include_controls=False,
                             unknown_perturbations="generic")
        rows = ratios(pred, prep, model.keys, model.split.test, n_samples=args.n_samples, mode=args.replicates)
        med = float(np.median([r["median_ratio"] for r in rows]))
        iid = float(np.median([r["median_iid_ratio"] for r in rows]))
        results[f"{split}/{seed}"] = {"rows": rows, "median_ratio": med, "median_iid_ratio": iid}
        per = ", ".join(f"{r['median_ratio']:.2f}" for r in rows)
        print(f"{split} {seed}: predicted / real between-replicate variance, median {med:.2f} "
              f"(per condition {per}); independent draws of the predicted cells would give {iid:.2f}", flush=True)
        atomic_write_json(args.out, {"tag": args.tag, "n_samples": args.n_samples, "replicates": args.replicates,
                                     "runs": results})

if __name__ == "__main__":
    main()
