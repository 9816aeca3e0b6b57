"""CPU speed levers of a training step, timed interleaved in one process (so machine load hits each alike).

    python benchmarks/bench_levers.py [--preset small] [--genes 2000] [--threads 1] [--rounds 7]

Each lever is a config change of the default; its trainer steps on the same random batch (as bench_model.py).
Reported: median seconds per step and the ratio to the default, under the path of the package timed. To compare two
commits instead, check each out into its own folder and alternate them with the default alone
(``PYTHONPATH=old/src python benchmarks/bench_levers.py --preset tiny --levers "default (fp32)" --rounds 200``).
Quality is not measured here: a lever that is faster still has to keep the benchmark scores (docs/PERFORMANCE.md,
"Levers").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perturbdiff  # noqa: E402
from bench_model import make_batch, make_trainer  # noqa: E402
from perturbdiff.config import Config  # noqa: E402

LEVERS = {
    "default (fp32)": [],
    "bf16 autocast": ["train.precision=bf16"],
    "torch.compile": ["train.compile=true"],
    "no self-conditioning pass": ["diffusion.self_cond_prob=0"],
    "no energy distance": ["diffusion.ed_weight=0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated names of LEVERS")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = Config.from_preset(args.preset)
    batch = make_batch(base.data.batch_sets, base.data.set_size, args.genes)
    steps, first = {}, {}
    for name in args.levers.split(","):
        trainer = make_trainer(base.with_items(LEVERS[name]), args.genes)
        batches = itertools.repeat(batch)
        t = time.perf_counter()
        trainer.train_step(batches)  # warm-up (compiles under torch.compile)
        first[name] = time.perf_counter() - t
        trainer.train_step(batches)
        steps[name] = lambda tr=trainer, b=batches: tr.train_step(b)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    ref = statistics.median(times[next(iter(times))])
    print(f"{Path(perturbdiff.__file__).parent}: preset {args.preset}, G = {args.genes}, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved steps\n")
    print("| lever | ms / step | vs default | first step s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.1f} | {ref / m:.2f}x faster | {first[name]:.1f} |")


if __name__ == "__main__":
    main()
