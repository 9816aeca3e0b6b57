"""Cost of a training step and of a sampled set against the number of genes, for the scale codec (every gene is a
width of the denoiser) and the latent codec (the denoiser sees D latent dimensions; the genes are met only by the
autoencoder, fitted once, and by decoding).

    OMP_NUM_THREADS=1 python benchmarks/bench_codec.py --genes 500,2000,8000,16000 --out bench_work/codec_cost.json

Each (codec, G) runs in its own subprocess (its peak RSS is its own) on simulated counts (N cells, preprocessed with
every gene kept), preset small, S = 64, B = 8. A training step is timed end to end (data loading, loss, backward,
AdamW, EMA) as the difference of two trainings of ``--short`` and ``--long`` steps divided by the step difference,
so set-up (encoding the cells once included) cancels; the autoencoder is fitted once before, timed on its own (per
step of 256 cells). Sampling: the time to
predict ``--cells`` cells of one condition (25 flow steps, decoding included), per set of S cells.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(codec: str, n_genes: int, n_cells: int, short: int, long: int, cells: int) -> dict:
    import numpy as np

    from perturbdiff import Config, PerturbDiff
    from perturbdiff.data import DataKeys, make_split, preprocess
    from perturbdiff.datasets import simulate

    counts = simulate(n_cells, n_genes, n_cell_types=3, n_batches=1, n_perturbations=6, n_combos=0, seed=0)
    keys = DataKeys(pert_key="perturbation", control_value="control", context_keys=("cell_type",),
                    input_kind="counts")
    prep = preprocess(counts, keys, var_names=list(counts.var_names))
    split = make_split(prep, keys, "held-out-contexts-partial", holdout="CT1", seed=0)
    cfg = Config.from_preset("small").update({"data": {"set_size": 64, "batch_sets": 8},
                                              "train": {"val_every": 10**6, "log_every": 10**6},
                                              "codec": {"kind": codec, "latent_steps": 50}})
    model, fitted, fit_ms = PerturbDiff.from_config(cfg, prep, split), None, None
    if codec == "latent":  # fitted once, timed on its own; both trainings below use it
        t0 = time.perf_counter()
        fitted = model.codec.fit(prep.X, np.arange(prep.n_obs))
        fit_ms = 1000 * (time.perf_counter() - t0) / fitted.steps
    times = {}
    for steps in (short, long):
        model = PerturbDiff.from_config(cfg, prep, split)
        if fitted is not None:
            model.set_codec(fitted)
        t0 = time.perf_counter()
        model.train(max_steps=steps, progress=False, device="cpu")
        times[steps] = time.perf_counter() - t0
    step_ms = 1000 * (times[long] - times[short]) / (long - short)
    cond = split.test[0]
    model.predict([cond], n_cells=cells, include_controls=False, progress=False)  # warm
    t0 = time.perf_counter()
    model.predict([cond], n_cells=cells, include_controls=False, progress=False)
    sample_ms = 1000 * (time.perf_counter() - t0) / (cells / 64)
    return {"codec": codec, "genes": n_genes, "cells": n_cells, "step_ms": step_ms, "ae_step_ms": fit_ms,
            "sample_ms_per_set": sample_ms, "parameters": sum(p.numel() for p in model.network.parameters()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", default="500,2000,8000,16000")
    ap.add_argument("--codecs", default="scale,latent")
    ap.add_argument("--cells", type=int, default=512, help="cells sampled for the sampling time")
    ap.add_argument("--n-cells", type=int, default=3000, help="simulated cells")
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=25)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # codec:G, run in this process
    args = ap.parse_args()
    if args.one:
        codec, g = args.one.split(":")
        print(json.dumps(measure(codec, int(g), args.n_cells, args.short, args.long, args.cells)))
        return
    rows = []
    for g in [int(x) for x in args.genes.split(",")]:
        for codec in args.codecs.split(","):
            cmd = [sys.executable, __file__, "--one", f"{codec}:{g}", "--cells", str(args.cells),
                   "--n-cells", str(args.n_cells), "--short", str(args.short), "--long", str(args.long)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{codec:6s} G={g:6d}: step {r['step_ms']:7.0f} ms, sample {r['sample_ms_per_set']:6.0f} ms/set, "
                  f"{r['parameters'] / 1e6:5.1f} M parameters, peak {r['peak_rss_mb']:6.0f} MB", flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
