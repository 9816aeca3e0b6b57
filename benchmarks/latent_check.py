"""The latent codec's autoencoder on the shared splits, chosen on validation conditions only: for each latent size,
fit the autoencoder on the split's training cells (as ``perturbdiff train --codec latent`` does) and read back the
validation conditions' cells (never seen by it) through encode → decode. Scored per condition against the real
cells: the decoded pseudobulk's pearson_Δ and R² of Δ (a ceiling for any latent model), the zero rate of decoded
cells against the real one, and the fit time.

    OMP_NUM_THREADS=1 python benchmarks/latent_check.py --work bench_work --dims 32,64,128 \\
        --out bench_work/latent_check.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="real_benchmark.py's folder (holds <split>/prep.h5ad)")
    ap.add_argument("--splits", default="kang_celltype,devel_gbm,devel_combo")
    ap.add_argument("--dims", default="32,64,128")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder of the split JSON files")
    ap.add_argument("--subset", default="val", help="conditions to read back (val; test only for reporting)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    import anndata as ad

    from perturbdiff._io import atomic_write_json
    from perturbdiff.config import CodecConfig
    from perturbdiff.data import CellSetIndex, DataKeys, LatentCodec, Split, as_csr, get_record, training_mask
    from perturbdiff.evaluate import metric

    pearson_delta = metric("pearson_delta").compute
    out: dict = {}
    for name in args.splits.split(","):
        split = Split.read(args.shared / f"{name}.json")
        prep = ad.read_h5ad(args.work / name / "prep.h5ad")
        keys = DataKeys.from_dict(get_record(prep)["keys"])
        conds = split.subset(args.subset)
        index = CellSetIndex.build(prep, keys, conds)
        X = as_csr(prep.X)
        rows = np.flatnonzero(training_mask(prep, keys, split))
        for dim in [int(d) for d in args.dims.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = CodecConfig(kind="latent", latent_dim=dim, latent_steps=args.steps)
                t0 = time.perf_counter()
                codec = LatentCodec.from_config(prep.n_vars, cfg, seed=seed).fit(X, rows)
                fit_s = time.perf_counter() - t0
                rs, r2s, zr, zd = [], [], [], []
                for i, g in enumerate(index.groups):
                    real = X[g].toarray()
                    ctrl = X[index.control_pool(i)].toarray()
                    dec = codec.from_model(codec.to_model(real), seed=seed)
                    d_real, d_dec = real.mean(0) - ctrl.mean(0), dec.mean(0) - ctrl.mean(0)
                    rs.append(pearson_delta(dec.mean(0), real.mean(0), ctrl.mean(0)))
                    r2s.append(1 - np.sum((d_dec - d_real) ** 2) / np.sum((d_real - d_real.mean()) ** 2))
                    zr.append(float(np.mean(real == 0)))
                    zd.append(float(np.mean(dec == 0)))
                row = {"dim": dim, "seed": seed, "fit_s": fit_s, "pearson_delta": float(np.mean(rs)),
                       "r2_delta": float(np.mean(r2s)), "zero_rate_real": float(np.mean(zr)),
                       "zero_rate_decoded": float(np.mean(zd)), "held_out": codec.quality}
                out.setdefault(name, []).append(row)
                print(f"{name} dim {dim} seed {seed}: pearson_Δ {row['pearson_delta']:.3f} r2_Δ "
                      f"{row['r2_delta']:.3f} zeros {row['zero_rate_decoded']:.3f} (real {row['zero_rate_real']:.3f}) "
                      f"cell r {codec.quality['cell_pearson']:.3f} fit {fit_s:.0f} s", flush=True)
                atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
