"""Cost of a training step and of a sampled set against the number of genes, for the scale codec (every gene is a
width of the denoiser) and the latent codec (the denoiser sees D latent dimensions; the genes are met only by the
autoencoder, fitted once before training, and by decoding).

    OMP_NUM_THREADS=1 python benchmarks/bench_codec.py --genes 500,2000,8000,16000 --out bench_work/codec_cost.json

Simulated counts (N cells, preprocessed with every gene kept), preset small, S = 64, B = 8, one thread. One
subprocess builds both runs for every G (the latent one with an autoencoder fitted for 50 steps: its cost, not its
quality, is measured here) and times all of them interleaved — rounds over every (G, codec), the median over rounds
— so the ratios, across codecs and across gene counts, are measured under the same load:
- a training step: ``Trainer.train_step`` (loss, backward, AdamW, EMA) on batches gathered before, plus the gather
  itself (a CSR gather over G genes for the scale codec, D-wide rows of the cells encoded once for the latent one);
- a sampled set: the flow's 25 Euler steps for B sets from their control cells, the codec's encoding of those
  controls and decoding of the result (zeros drawn), per set;
- one step of the autoencoder's fit (256 cells), which happens ``codec.latent_steps`` times before training.
Peak memory: a separate subprocess per (codec, G) trains 3 steps and predicts one condition; its ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _data(n_genes: int, n_cells: int):
    from perturbdiff.data import DataKeys, make_split, preprocess
    from perturbdiff.datasets import simulate

    counts = simulate(n_cells, n_genes, n_cell_types=3, n_batches=1, n_perturbations=6, n_combos=0, seed=0)
    keys = DataKeys(pert_key="perturbation", control_value="control", context_keys=("cell_type",),
                    input_kind="counts")
    prep = preprocess(counts, keys, var_names=list(counts.var_names))
    return prep, make_split(prep, keys, "held-out-contexts-partial", holdout="CT1", seed=0)


def _config(codec: str):
    from perturbdiff import Config

    return Config.from_preset("small").update({"data": {"set_size": 64, "batch_sets": 8},
                                               "train": {"val_every": 10**6, "log_every": 10**6},
                                               "codec": {"kind": codec, "latent_steps": 50}})


def timing(genes: list[int], n_cells: int, rounds: int, steps: int) -> list[dict]:
    """Every (G, codec) built first, then timed in rounds over all of them: each median is taken over the same
    spread of machine load."""
    import numpy as np

    from perturbdiff import PerturbDiff
    from perturbdiff.data import CellSetDataset, CellSetIndex
    from perturbdiff.model._generate import generate, plan_sets
    from perturbdiff.train import run_trainer

    runs, ae_ms = {}, {}
    for g in genes:
        prep, split = _data(g, n_cells)
        for codec in ("scale", "latent"):
            model = PerturbDiff.from_config(_config(codec), prep, split)
            if not model.codec.fitted:
                t0 = time.perf_counter()
                model.set_codec(model.codec.fit(prep.X, np.arange(prep.n_obs)))
                ae_ms[g] = 1000 * (time.perf_counter() - t0) / model.codec.steps
            index = CellSetIndex.build(prep, model.keys, split.train)
            ds = CellSetDataset(prep, index, model.vocab, set_size=64, seed=0, codec=model.codec)
            trainer = run_trainer(model.network, model.process, ds, model.cfg, meta=model._meta, validate=None,
                                  out_dir=None, device="cpu")
            cond = [split.test[0]]
            pool = CellSetIndex.build(prep, model.keys, cond).control_pool(0)
            plan = plan_sets([8 * 64], 64, 1, 0, [pool])
            runs[g, codec] = (model, ds, trainer, plan, model._covariates(prep, cond, plan), prep)
    times = {k: {"step": [], "gather": [], "sample": []} for k in runs}
    for _ in range(rounds):
        for key, (model, ds, trainer, plan, cov, prep) in runs.items():
            order = np.arange(len(ds))
            t0 = time.perf_counter()
            batches = [ds.__getitems__(order[8 * i:8 * i + 8]).batched for i in range(steps)]
            times[key]["gather"].append(1000 * (time.perf_counter() - t0) / steps)
            it = iter(batches)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(it)
            times[key]["step"].append(1000 * (time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            cells = generate(model, plan, cov, X=prep.X, settings=model.cfg.sample, progress=False, device="cpu")
            model.codec.from_model(cells.reshape(-1, cells.shape[-1]))
            times[key]["sample"].append(1000 * (time.perf_counter() - t0) / len(plan))
    rows = []
    for g in genes:
        row = {"genes": g, "ae_step_ms": ae_ms[g]}
        for codec in ("scale", "latent"):
            row[codec] = {k: statistics.median(v) for k, v in times[g, codec].items()}
            row[codec]["parameters"] = sum(p.numel() for p in runs[g, codec][0].network.parameters())
        rows.append(row)
    return rows


def peak(codec: str, n_genes: int, n_cells: int) -> float:
    from perturbdiff import PerturbDiff

    prep, split = _data(n_genes, n_cells)
    model = PerturbDiff.from_config(_config(codec), prep, split).train(max_steps=3, progress=False, device="cpu")
    model.predict([split.test[0]], n_cells=512, include_controls=False, progress=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", default="500,2000,8000,16000")
    ap.add_argument("--n-cells", type=int, default=3000, help="simulated cells")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per round and codec")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--timing", help=argparse.SUPPRESS)  # G,G,...: run the interleaved timing here
    ap.add_argument("--peak", help=argparse.SUPPRESS)  # codec:G: measure peak memory here
    args = ap.parse_args()
    if args.timing:
        genes = [int(x) for x in args.timing.split(",")]
        print(json.dumps(timing(genes, args.n_cells, args.rounds, args.steps)))
        return
    if args.peak:
        codec, g = args.peak.split(":")
        print(json.dumps({"peak_rss_mb": peak(codec, int(g), args.n_cells)}))
        return
    rows = _child(["--timing", args.genes, "--n-cells", str(args.n_cells), "--rounds", str(args.rounds),
                   "--steps", str(args.steps)])
    for r in rows:
        g = r["genes"]
        for codec in ("scale", "latent"):
            r[codec]["peak_rss_mb"] = _child(["--peak", f"{codec}:{g}", "--n-cells", str(args.n_cells)])["peak_rss_mb"]
        s, la = r["scale"], r["latent"]
        print(f"G={g:6d}: step scale {s['step'] + s['gather']:6.0f} ms, latent {la['step'] + la['gather']:6.0f} ms "
              f"(ratio {(la['step'] + la['gather']) / (s['step'] + s['gather']):.2f}); sample per set scale "
              f"{s['sample']:5.0f} ms, latent {la['sample']:5.0f} ms; autoencoder step {r['ae_step_ms']:5.0f} ms; "
              f"peak scale {s['peak_rss_mb']:5.0f} MB, latent {la['peak_rss_mb']:5.0f} MB", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
