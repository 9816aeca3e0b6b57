"""Write benchmarks/splits/devel_unseen.json: perturbations never seen in training, on perturbench_devel (issue 14).

Six of the data's 18 single perturbations, drawn with seed 0, are held out in every cell line, with every
combination that contains one of them; two of the six are the validation perturbations (so validation, like
test, asks for perturbations the model never saw), the other four and their combinations are test. Genes: the
shared devel splits' 500 (the file's own). Reproduce:

    python benchmarks/make_unseen_split.py      # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def main() -> None:
    import anndata as ad

    from perturbdiff.data import DataKeys, condition_codes, make_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(HERE / "splits" / "devel_unseen.json"))
    ap.add_argument("--n-holdout", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shared = Path(args.shared)
    gbm = json.loads((shared / "benchmarks" / "devel_gbm.json").read_text())
    adata = ad.read_h5ad(shared / gbm["source"])
    keys = DataKeys(gbm["pert_col"], gbm["control"], tuple(gbm["context_cols"]), "log1p")
    singles = sorted({str(p) for p in adata.obs[keys.pert_key].unique()} - {keys.control_value})
    singles = [p for p in singles if "+" not in p]
    holdout = sorted(np.random.default_rng(args.seed).choice(singles, args.n_holdout, replace=False).tolist())
    split = make_split(adata, keys, "held-out-perturbations", holdout=holdout, seed=args.seed, n_val=2)
    code, conds = condition_codes(adata, keys)
    counts = dict(zip(conds, np.bincount(code, minlength=len(conds)).tolist()))
    split.name, split.dataset, split.source = "devel_unseen", "devel", gbm["source"]
    split.preprocess, split.var_names = gbm["preprocess"], gbm["var_names"]
    split.test_n_cells = [int(counts[c]) for c in split.test]
    split.write(args.out)
    print(f"{args.out}: held out {', '.join(holdout)}; val {sorted({p for _, p in split.val})}; "
          f"{len(split.train)} train, {len(split.val)} val, {len(split.test)} test conditions")


if __name__ == "__main__":
    main()
