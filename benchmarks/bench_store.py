"""Out-of-core store: set reads/s of candidate formats, then training from 10 k / 100 k / 2 M-cell stores.

    OMP_NUM_THREADS=1 python benchmarks/bench_store.py [--out /work/scratch/store_bench] [--sizes 10000,100000,2000000]

Data: synthetic log1p CSR, 2,000 genes, ~200 stored values per cell (Poisson), 4 cell types x (control + 50
perturbations), 20 % controls, 3 batches. Every store is generated block by block (100 k cells at a time) and
written through perturbdiff's store writer: X is never in memory whole. Each size trains in its own subprocess
(its own peak RSS): preset tiny (S = 32, B = 8), one thread, in-process loader (num_workers = 0). The output folder is
deleted at the end unless --keep. Sizes are interleaved over --rounds (the machine's load drifts) and each file is read
once before its run (timed with the store in the page cache; the format table also times cold reads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbdiff.data import DataKeys, Split, open_store, write_store_blocks

G, NNZ, N_CT, N_PERT, BLOCK = 2000, 200, 4, 50, 100_000
KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p", batch_key="batch")
S, B = 32, 8


def synthetic_obs(n: int, seed: int = 0) -> pd.DataFrame:
    """Cells already sorted by condition (cell type, perturbation); batches at random."""
    rng = np.random.default_rng(seed)
    ct = np.sort(rng.integers(0, N_CT, n))
    pert = np.where(rng.random(n) < 0.2, 0, rng.integers(1, N_PERT + 1, n))
    pert = pert[np.lexsort((pert, ct))]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical.from_codes(ct, [f"CT{i}" for i in range(N_CT)]),
        "perturbation": pd.Categorical.from_codes(pert, ["control"] + [f"P{i:02d}" for i in range(1, N_PERT + 1)]),
        "batch": pd.Categorical.from_codes(rng.integers(0, 3, n), ["b0", "b1", "b2"])})
    obs.index = np.char.add("c", np.arange(n).astype(str))
    return obs


def synthetic_blocks(pert: np.ndarray, lens: np.ndarray, seed: int = 0):
    """CSR blocks of BLOCK cells: stratified distinct gene indices, log1p(gamma) values, +1 on a 20-gene programme."""
    for a in range(0, len(lens), BLOCK):
        rng = np.random.default_rng([seed, a])
        L = lens[a : a + BLOCK]
        ptr = np.r_[0, np.cumsum(L)]
        k = np.arange(ptr[-1]) - np.repeat(ptr[:-1], L)  # position within the row
        idx = ((k + rng.random(ptr[-1])) * (G / np.repeat(L, L))).astype(np.int32)  # increasing, distinct, < G
        val = np.log1p(rng.gamma(2.0, 1.0, ptr[-1])).astype(np.float32)
        p = np.repeat(pert[a : a + BLOCK], L)
        val += ((p > 0) & ((idx - p * 37) % G < 20)).astype(np.float32)
        yield sp.csr_matrix((val, idx, ptr), shape=(len(L), G))


def make_store(path: Path, n: int) -> float:
    """Write an n-cell synthetic store block by block; returns seconds."""
    t = time.perf_counter()
    obs = synthetic_obs(n)
    lens = np.minimum(np.random.default_rng(1).poisson(NNZ, n), G)
    genes = [f"g{i:04d}" for i in range(G)]
    record = {"format": 1, "keys": KEYS.to_dict(), "input_kind": "log1p", "normalize": None, "log1p": False,
              "genes": genes, "gene_selection": {"method": "given", "n_top": G, "flavor": None, "n_train_cells": None},
              "scale": 10.0, "versions": {}}
    codes = obs["perturbation"].cat.codes.to_numpy()
    write_store_blocks(path, obs, pd.DataFrame(index=genes), {"perturbdiff": {"record": json.dumps(record)}},
                       synthetic_blocks(codes, lens), int(lens.sum()))
    return time.perf_counter() - t


def synthetic_split() -> Split:
    perts = [f"P{i:02d}" for i in range(1, N_PERT + 1)]
    test = [(("CT3",), p) for p in perts[:5]]
    train = [((f"CT{c}",), p) for c in range(N_CT) for p in perts if ((f"CT{c}",), p) not in test]
    return Split(name="bench", pert_col="perturbation", control="control", context_cols=["cell_type"],
                 train=train, val=[], test=test)


def set_rows(store, rng, n_sets: int) -> np.ndarray:
    """Rows of ``n_sets`` sets of S cells, each drawn within one condition's region (as the sampler does)."""
    g = store.groups
    pick = rng.integers(0, len(g), n_sets)
    start, size = g["start"].to_numpy()[pick], (g["end"] - g["start"]).to_numpy()[pick]
    return (start[:, None] + (rng.random((n_sets, S)) * size[:, None]).astype(np.int64)).ravel()


def rate(read, store, seconds: float = 3.0, cold: bool = False) -> float:
    """Sets/s of ``read(rows)`` for batches of 2·B sets (B target + B control); cold: evict the file before each."""
    rng, n, t = np.random.default_rng(0), 0, time.perf_counter()
    fd = os.open(store.path / "cells.h5ad", os.O_RDONLY)
    while time.perf_counter() - t < seconds:
        rows = set_rows(store, rng, 2 * B)
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read(rows)
        n += 2 * B
    os.close(fd)
    return n / (time.perf_counter() - t)


def formats(out: Path) -> None:
    """Set reads/s of the same 200 k-cell CSR: h5py row slices, anndata backed, zarr, the store's memory map."""
    import h5py
    from anndata.io import sparse_dataset

    make_store(out / "fmt", 200_000)
    store = open_store(out / "fmt")
    X = store.X[:]
    ip = X.indptr
    with h5py.File(out / "plain.h5", "w") as f:
        f["data"], f["indices"], f["indptr"] = X.data, X.indices, X.indptr
    rows_of = {}
    f = h5py.File(out / "plain.h5", "r")
    d, i = f["data"], f["indices"]
    rows_of["h5py, one slice per row (contiguous)"] = lambda r: [(d[ip[j]:ip[j + 1]], i[ip[j]:ip[j + 1]])
                                                                 for j in np.sort(r)]
    backed = sparse_dataset(h5py.File(store.path / "cells.h5ad", "r")["X"])
    rows_of["anndata backed CSR, X[sorted rows]"] = lambda r: backed[np.sort(r)]
    try:
        import zarr

        z = zarr.open_group(out / "x.zarr", mode="w")
        zd = z.create_array("data", data=X.data, chunks=(1 << 16,), compressors=None)
        zi = z.create_array("indices", data=X.indices, chunks=(1 << 16,), compressors=None)

        def zarr_rows(r):
            el = np.sort(store.X.elements(r)[1])
            return zd.get_coordinate_selection(el), zi.get_coordinate_selection(el)

        rows_of[f"zarr {zarr.__version__}, 64 Ki chunks, coordinate selection"] = zarr_rows
    except ImportError:
        pass
    print("| format (200 k cells x 2,000 genes, batches of 16 sets x 32 cells) | page cache | sets/s | ms per batch |")
    print("|---|---|---|---|")
    for name, read in rows_of.items():
        r = rate(read, store)
        print(f"| {name} | warm | {r:,.0f} | {2 * B / r * 1e3:.1f} |", flush=True)
    for cold in (False, True):
        for prefetch in (False, True, None):
            store.X.prefetch = prefetch
            r = rate(store.X.__getitem__, store, cold=cold)
            mode = {False: "off", True: "on", None: "automatic (default)"}[prefetch]
            name = f"store: mmap + one vectorised gather, prefetch {mode}"
            print(f"| {name} | {'cold' if cold else 'warm'} | {r:,.0f} | {2 * B / r * 1e3:.1f} |", flush=True)
    f.close()


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's at exec)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: Path, steps: int) -> dict:
    """Train from the store at ``path``; ms/step, loader sets/s, startup, peak RSS (this process only)."""
    import torch

    from perturbdiff import Config, PerturbDiff

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    store = open_store(path)
    t_open = time.perf_counter() - t0
    cfg = Config.from_preset("tiny").update({"train": {"warmup_steps": 5, "max_steps": 10**6}})
    model = PerturbDiff.from_config(cfg, store, synthetic_split())
    t_cfg = time.perf_counter() - t0 - t_open
    model.train(max_steps=2, progress=False, device="cpu")  # builds index, data set and trainer
    trainer = model.trainer
    batches = trainer.loader.stream()
    for _ in range(3):
        trainer.train_step(batches)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t)
    step_ms = float(np.median(times)) * 1e3  # the median: robust to other jobs' bursts on a shared machine
    ds, rng, n = trainer.loader.dataset, np.random.default_rng(0), 0
    t = time.perf_counter()
    while time.perf_counter() - t < 3.0:
        ds.__getitems__(rng.integers(0, len(ds), B).tolist())
        n += B
    loader = n / (time.perf_counter() - t)
    return {"cells": store.n_obs, "stored_gb": store.X.nnz * 8 / 1e9, "open_s": t_open, "from_config_s": t_cfg,
            "step_ms": step_ms, "step_ms_mean": float(np.mean(times)) * 1e3, "loader_sets_s": loader,
            "consumed_sets_s": B / step_ms * 1e3, "peak_rss_mb": peak_rss_mb()}


def warm(path: Path) -> None:
    """Read the store's file once, so every size is timed with its file in the page cache (the steady state)."""
    with open(path / "cells.h5ad", "rb") as fh:
        while fh.read(1 << 24):
            pass


def summarise(runs: dict[int, list[dict]], gen: dict[int, float]) -> None:
    """Medians over the rounds (each round's step time is itself a median); RSS: the highest."""
    med = {n: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for n, rs in runs.items()}
    print("| cells | CSR on disk (GB) | write (s) | open + from_config (s) | ms/step | loader sets/s | "
          "sets/s consumed | loader / consumed | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, m in med.items():
        rss = max(r["peak_rss_mb"] for r in runs[n])
        print(f"| {n:,} | {m['stored_gb']:.2f} | {gen[n]:.0f} | {m['open_s']:.1f} + {m['from_config_s']:.1f} | "
              f"{m['step_ms']:.0f} | {m['loader_sets_s']:,.0f} | {m['consumed_sets_s']:.0f} | "
              f"{m['loader_sets_s'] / m['consumed_sets_s']:.0f}x | {rss:,.0f} |")
    first = min(runs)
    for n in runs:
        ratios = [b["step_ms"] / a["step_ms"] for a, b in zip(runs[first], runs[n])]
        print(f"step time {n:,} / {first:,} cells, per round: " + ", ".join(f"{x:.2f}" for x in ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/scratch/store_bench", help="scratch folder (deleted at the end)")
    p.add_argument("--sizes", default="10000,100000,2000000", help="comma-separated store sizes (cells)")
    p.add_argument("--steps", type=int, default=25, help="timed training steps per size and round (median)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all sizes (interleaved against load drift)")
    p.add_argument("--skip-formats", action="store_true", help="skip the format comparison")
    p.add_argument("--keep", action="store_true", help="keep the generated stores")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.steps)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_formats:
            formats(out)
        sizes = [int(s) for s in args.sizes.split(",")]
        gen = {n: make_store(out / f"s{n}", n) for n in sizes}
        print("generated: " + ", ".join(f"{n:,} cells in {t:.0f} s" for n, t in gen.items()), flush=True)
        runs: dict[int, list[dict]] = {n: [] for n in sizes}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for _ in range(args.rounds):
            for n in sizes:
                warm(out / f"s{n}")
                res = subprocess.run([sys.executable, __file__, "--child", str(out / f"s{n}"), "--steps",
                                      str(args.steps)], capture_output=True, text=True, env=env, check=True)
                runs[n].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[n][-1]), flush=True)
        summarise(runs, gen)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
