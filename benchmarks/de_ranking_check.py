"""Why a run's DE ranking (cell-eval's roc_auc) is what it is: per test condition, the real and predicted DE gene
counts, cell-eval's roc_auc, and the roc_auc the same real DE calls would get from two other gene rankings: the size
of the predicted pseudobulk shift, and the control mean alone.

    python benchmarks/de_ranking_check.py --work bench_work --split devel_combo --tag tiny-anchor-5k --seed 0

cell-eval ranks genes by -log10 of the predicted DE test's FDR (clipped at 1e-10). Where the predicted cells make no
gene significant every gene ties at FDR 1 and the condition scores 0.5, however well the shift points. Test
conditions only, for diagnosis, not for choosing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare  # noqa: E402


def rows_of(pred_ct, real_ct, split) -> list[dict]:
    from cell_eval import MetricsEvaluator
    from sklearn.metrics import roc_auc_score

    from perturbdiff.data import as_csr

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        ev = MetricsEvaluator(adata_pred=pred_ct, adata_real=real_ct, control_pert=split.control,
                              pert_col=split.pert_col, num_threads=2, outdir=tmp, prefix=None)
        ev.compute(profile="full", write_csv=False)
    de = ev.de_comparison
    real, pred = de.real.data.to_pandas(), de.pred.data.to_pandas()
    tc, fc = de.real.target_col, de.real.feature_col
    genes = list(real_ct.var_names)
    is_ctrl = (real_ct.obs[split.pert_col] == split.control).to_numpy()
    ctrl_mean = as_csr(real_ct.X[is_ctrl]).mean(0).A1
    out = []
    for pert in real[tc].unique():
        a = real[real[tc] == pert].set_index(fc)
        b = pred[pred[tc] == pert].set_index(fc).reindex(a.index)
        label = (a[de.real.fdr_col] < 0.05).to_numpy().astype(int)
        if not 0 < label.sum() < len(label):
            continue
        q = b[de.pred.fdr_col].fillna(1.0).clip(1e-10, 1.0).to_numpy()
        cells = as_csr(pred_ct.X[(pred_ct.obs[split.pert_col] == pert).to_numpy()])
        ix = [genes.index(g) for g in a.index]
        shift = (cells.mean(0).A1 - ctrl_mean)[ix]
        out.append({"condition": pert, "real DE genes": int(label.sum()),
                    "predicted DE genes": int((b[de.pred.fdr_col].fillna(1.0) < 0.05).sum()),
                    "roc_auc (cell-eval)": roc_auc_score(label, -np.log10(q)),
                    "roc_auc by predicted shift size": roc_auc_score(label, np.abs(shift)),
                    "roc_auc by control mean": roc_auc_score(label, ctrl_mean[ix])})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work", help="working folder of real_benchmark.py runs")
    p.add_argument("--split", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", default=str(SHARED), help="the shared/ folder with data/ and benchmarks/")
    args = p.parse_args()
    from perturbdiff import PerturbDiff
    from perturbdiff.evaluate import build_real, context_column

    prep, split, _ = prepare(args.split, Path(args.work), Path(args.shared))
    model = PerturbDiff.load(Path(args.work) / args.split / args.tag / f"seed{args.seed}" / "run", adata=prep)
    pred = model.predict(subset="test", seed=args.seed, progress=False, unknown_perturbations="generic")
    real, ctx = context_column(build_real(prep, split, "test"), split.context_cols)
    pred, _ = context_column(pred, split.context_cols)
    rows = []
    for c in real.obs[ctx].unique():
        rows += rows_of(pred[pred.obs[ctx] == c].copy(), real[real.obs[ctx] == c].copy(), split)
    table = pd.DataFrame(rows).set_index("condition")
    table.loc["mean"] = table.mean()
    print("| condition | " + " | ".join(table.columns) + " |")
    print("|---" * (len(table.columns) + 1) + "|")
    for name, row in table.iterrows():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if "roc" in k else f"{v:.1f}" for k, v in row.items()) + " |")


if __name__ == "__main__":
    main()
