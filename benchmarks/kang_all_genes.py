"""The Kang IFN-β file with all of its genes after filtering (no HVG cut), trained with the latent codec on the
``kang_celltype`` conditions: does it fit in memory and train, at what cost, and how does it score.

    OMP_NUM_THREADS=1 python benchmarks/kang_all_genes.py --work bench_work --steps 2000 \\
        --set codec.latent_steps=1000 --out bench_work/kang_all_genes.json

Genes detected in fewer than ``--min-cells`` cells are dropped (scanpy's ``filter_genes``); every other gene is
kept (``n_hvg`` = the number left, so the selection is "all"). The split is the shared one without its 2,000-gene
list. Scored with cell-eval on the test conditions, per context, like ``real_benchmark.py``; peak RSS from the OS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--min-cells", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], help="config override SECTION.KEY=VALUE")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    import anndata as ad
    import scanpy as sc

    from perturbdiff import Config, PerturbDiff
    from perturbdiff._io import atomic_write_json
    from perturbdiff.data import DataKeys, Split, preprocess, register
    from real_benchmark import score

    d = json.loads((args.shared / "benchmarks" / "kang_celltype.json").read_text())
    d.pop("var_names", None)
    split = Split.from_dict(d)
    keys = DataKeys(split.pert_col, split.control, tuple(split.context_cols), "counts")
    cache = args.work / "kang_all_genes" / "prep.h5ad"
    if cache.exists():
        prep = ad.read_h5ad(cache)
    else:
        raw = ad.read_h5ad(args.shared / split.source)
        sc.pp.filter_genes(raw, min_cells=args.min_cells)
        register(raw, keys)
        prep = preprocess(raw, keys, n_hvg=raw.n_vars, split=split)
        cache.parent.mkdir(parents=True, exist_ok=True)
        prep.write_h5ad(cache)
    print(f"{prep.n_obs} cells x {prep.n_vars} genes", flush=True)
    cfg = Config.from_preset(args.preset).update({"train": {"max_steps": args.steps, "seed": args.seed},
                                                  "codec": {"kind": "latent"}}).with_items(args.set)
    t0 = time.perf_counter()
    model = PerturbDiff.from_config(cfg, prep, split).train(out_dir=args.work / "kang_all_genes" / "run",
                                                             progress=False, resume=False)
    t_train = time.perf_counter() - t0
    model = PerturbDiff.load(args.work / "kang_all_genes" / "run", adata=prep)
    t0 = time.perf_counter()
    pred = model.predict(subset="test", seed=args.seed, progress=False)
    t_pred = time.perf_counter() - t0
    table, _ = score({"perturbdiff": pred}, prep, split)
    res = {**table.loc["perturbdiff"].to_dict(), "n_genes": int(prep.n_vars), "train_s": t_train,
           "predict_s": t_pred, "codec": model.codec.quality, "config": cfg.to_dict(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    atomic_write_json(args.out, res)
    print({k: round(v, 3) for k, v in res.items() if isinstance(v, float)}, flush=True)


if __name__ == "__main__":
    main()
