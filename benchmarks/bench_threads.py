"""Training-step time at 1 thread, at all cores, and under ``--threads auto``, on an idle machine and with busy
background processes: is auto within ~1.3x of the best fixed choice everywhere?

    python benchmarks/bench_threads.py [--preset small] [--genes 2000] [--loads 0,1,2] [--seconds 20]

Each (load, policy) runs in a fresh subprocess (its own OpenMP pool) while LOAD processes spin `while True: pass`;
"auto" times the training step at 1 and at all cores exactly as training does (the Trainer's probe), keeps the
choice and is then timed like the fixed counts. Markdown to stdout. Do not set OMP_NUM_THREADS (auto obeys it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_model import make_batch, make_trainer
    from perturbdiff._threads import cpu_cores, set_threads
    from perturbdiff.config import Config

    cfg = Config.from_preset(args.preset)
    trainer = make_trainer(cfg, args.genes)
    batch = make_batch(cfg.data.batch_sets, cfg.data.set_size, args.genes)
    calib_s = 0.0
    if args.policy == "auto":
        set_threads("auto")
        t = time.perf_counter()
        trainer._measure_threads(batch)
        calib_s = time.perf_counter() - t
    else:
        torch.set_num_threads(cpu_cores() if args.policy == "all" else int(args.policy))
    batches = itertools.repeat(batch)
    trainer.train_step(batches)  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < args.seconds or len(times) < 3:
        t = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "n": len(times), "threads": torch.get_num_threads(),
            "calibration_s": calib_s}


def run_one(args, load: int, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        time.sleep(1.0 if load else 0.0)
        cmd = [sys.executable, __file__, "--worker", "--policy", policy, "--preset", args.preset,
               "--genes", str(args.genes), "--seconds", str(args.seconds)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--loads", default="0,1,2", help="numbers of busy background processes")
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per (load, policy)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="1", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the raw numbers as JSON")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from perturbdiff._threads import cpu_cores

    rows = []
    for load in [int(x) for x in args.loads.split(",")]:
        r = {p: run_one(args, load, p) for p in ("1", "all", "auto")}
        best = min(r["1"]["step_s"], r["all"]["step_s"])
        rows.append({"load": load, **r, "auto_vs_best": r["auto"]["step_s"] / best})
        print(f"load {load}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    n = cpu_cores()
    print(f"| busy background processes | 1 thread | {n} threads | auto (chose) | auto / best fixed | calibration |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['load']} | {r['1']['step_s']:.3f} s | {r['all']['step_s']:.3f} s | {r['auto']['step_s']:.3f} s "
              f"({r['auto']['threads']}) | {r['auto_vs_best']:.2f}x | {r['auto']['calibration_s']:.1f} s |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
