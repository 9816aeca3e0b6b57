"""Is prediction-powered debiasing valid, and does it help? Measured on the shared splits' held-out conditions.

For each trained run (``real_benchmark.py``'s folders: ``<work>/<split>/<tag>/seed<k>/run``) the best checkpoint
predicts every held-out condition of its split (validation + test: none was trained on). Leave one out: each
held-out condition in turn is the target, the others are its related measured conditions (K = n_heldout − 1). Per
target and gene it records whether the nominal ``--level`` prediction interval covers the measured pseudobulk
response, the interval width, the DE calls at q = ``--fdr`` against the real DE genes (Wilcoxon, Benjamini–Hochberg
< 0.05 of the real cells against their context's controls, cell-eval's rule, computed with scanpy), and pearson_Δ /
R² (of pseudobulks, as real_benchmark) of four estimates: the model's own, debiased with tuned λ and with λ = 1, and
λ = 0 (the related conditions' mean response: the same information without the model).

    OMP_NUM_THREADS=1 python benchmarks/debias_check.py --work bench_work --tag flow-noise-2k \\
        --splits kang_celltype,devel_gbm,devel_combo --out bench_work/debias_flow-noise-2k.json
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

ESTIMATES = ("model", "tuned", "lam1", "lam0")
MIN_EFFECTS = (0.0, 0.05, 0.1, 0.2, 0.3)  # DE calls at each; the one to use is chosen on the validation targets


def real_de(adata, keys, conditions, fdr: float = 0.05) -> np.ndarray:
    """[J, G] genes whose real cells differ from their context's controls (Wilcoxon, BH-adjusted p < fdr)."""
    import scanpy as sc

    from perturbdiff.model._debias import codes_of

    out = np.zeros((len(conditions), adata.n_vars), bool)
    for j, (ctx, pert) in enumerate(conditions):
        cells = np.flatnonzero(codes_of(adata, keys, [(ctx, pert)]) == 0)
        ctrl = np.flatnonzero(codes_of(adata, keys, [(ctx, keys.control_value)]) == 0)
        sub = adata[np.concatenate([cells, ctrl])].copy()
        sub.obs["group"] = np.repeat(["pert", "ctrl"], [len(cells), len(ctrl)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(sub, "group", groups=["pert"], reference="ctrl", method="wilcoxon")
        res = sc.get.rank_genes_groups_df(sub, "pert").set_index("names").reindex(adata.var_names)
        out[j] = res["pvals_adj"].to_numpy() < fdr
    return out


def check_run(run_dir: Path, prep, *, level: float, fdr: float) -> dict:
    from sklearn.metrics import r2_score

    from perturbdiff import PerturbDiff
    from perturbdiff.evaluate import debias_responses
    from perturbdiff.model import generated_responses, measured_responses

    model = PerturbDiff.load(run_dir, adata=prep)
    held = [*model.split.val, *model.split.test]
    pred = model.predict(held, adata=prep, progress=False, include_controls=False, unknown_perturbations="generic")
    real, ctrl = measured_responses(prep, model.keys, held)
    gen, var = generated_responses(pred, model.keys, held, ctrl)
    de = real_de(prep, model.keys, held)
    rows = []
    for j in range(len(held)):
        rel = [k for k in range(len(held)) if k != j]
        est = {"model": gen[j]}
        for name, lam in (("tuned", None), ("lam1", 1.0), ("lam0", 0.0)):
            res = debias_responses(real[rel], gen[rel], gen[j:j + 1], lam=lam, level=level, target_var=var[j:j + 1])
            est[name] = res.delta[0]
            if name == "tuned":
                tuned = res
        inside = (real[j] >= tuned.lower[0]) & (real[j] <= tuned.upper[0])
        row = {"condition": "/".join([*held[j][0], held[j][1]]), "subset": "val" if j < len(model.split.val)
               else "test", "lam": tuned.lam, "coverage": float(inside.mean()),
               "width": float(np.mean(tuned.upper - tuned.lower)), "n_real_de": int(de[j].sum())}
        for tau in MIN_EFFECTS:
            called = debias_responses(real[rel], gen[rel], gen[j:j + 1], level=level, target_var=var[j:j + 1],
                                      min_effect=tau).called(fdr)[0]
            row[f"calls@{tau}"] = [int(called.sum()), int((called & ~de[j]).sum()), int((called & de[j]).sum())]
        for name, d in est.items():
            row[f"pearson_delta_{name}"] = float(np.corrcoef(d, real[j])[0, 1])
            row[f"r2_{name}"] = float(r2_score(ctrl[j] + real[j], ctrl[j] + d))
        rows.append(row)
    return {"run": str(run_dir), "n_heldout": len(held), "rows": rows}


def calls(rows: list[dict], tau: float) -> dict:
    """Calls per condition, false discovery proportion and recall of the real DE genes, pooled over ``rows``."""
    n, false, true = (sum(r[f"calls@{tau}"][i] for r in rows) for i in range(3))
    return {"n_called": n / len(rows), "fdp": false / n if n else 0.0,
            "recall": true / max(sum(r["n_real_de"] for r in rows), 1)}


def summarise(result: dict, subset: str = "test") -> dict:
    """Means over the leave-one-out targets of ``subset`` (the numbers compared with PEERS.md are over test
    conditions; the validation targets are where a DE threshold may be chosen)."""
    rows = [r for r in result["rows"] if r["subset"] == subset]
    out = {"coverage": float(np.mean([r["coverage"] for r in rows])),
           "width": float(np.mean([r["width"] for r in rows])), "lam": float(np.mean([r["lam"] for r in rows])),
           **{f"{k}@{tau}": v for tau in MIN_EFFECTS for k, v in calls(rows, tau).items()}}
    for name in ESTIMATES:
        out[f"pearson_delta_{name}"] = float(np.mean([r[f"pearson_delta_{name}"] for r in rows]))
        out[f"r2_{name}"] = float(np.mean([r[f"r2_{name}"] for r in rows]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--splits", default="kang_celltype,devel_gbm,devel_combo")
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--fdr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from _runs import trained_runs
    from perturbdiff._io import atomic_write_json

    results = {}
    for split, seed, prep, run in trained_runs(args.work, args.tag, args.splits):
        res = check_run(run, prep, level=args.level, fdr=args.fdr)
        res["summary"] = summarise(res)
        results[f"{split}/{seed}"] = res
        res["summary_val"] = summarise(res, "val")
        s = res["summary"]
        print(f"{split} {seed}: coverage {s['coverage']:.3f} width {s['width']:.3f} lam {s['lam']:.2f} "
              + " ".join(f"tau {t}: calls {s[f'n_called@{t}']:.1f} fdp {s[f'fdp@{t}']:.2f} "
                         f"recall {s[f'recall@{t}']:.2f}" for t in MIN_EFFECTS) + " | pearson_delta "
              + " ".join(f"{n} {s[f'pearson_delta_{n}']:.3f}" for n in ESTIMATES) + " | r2 "
              + " ".join(f"{n} {s[f'r2_{n}']:.3f}" for n in ESTIMATES), flush=True)
        atomic_write_json(args.out, {"level": args.level, "fdr": args.fdr, "tag": args.tag, "runs": results})


if __name__ == "__main__":
    main()
