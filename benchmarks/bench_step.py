"""Median time of one training step of a preset on this CPU, for comparing two versions of the code.

    python benchmarks/bench_step.py [--preset tiny] [--genes 2000] [--steps 200] [--threads 1]

The step is `Trainer.train_step` on one random loader-shaped batch (bench_model.py): self-conditioning pass, set
losses, backward, clip, AdamW, EMA. Prints the package's path, so a comparison can show which code it timed. To
compare two commits, check each out into its own folder and alternate the two, so machine load hits both alike:

    for i in 1 2 3 4 5; do
        PYTHONPATH=old/src python benchmarks/bench_step.py; PYTHONPATH=new/src python benchmarks/bench_step.py
    done
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=200, help="timed steps (after 5 untimed ones)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.from_preset(args.preset)
    batches = itertools.repeat(make_batch(cfg.data.batch_sets, cfg.data.set_size, args.genes))
    trainer = make_trainer(cfg, args.genes)
    for _ in range(5):
        trainer.train_step(batches)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t)
    print(f"{Path(perturbdiff.__file__).parent}: preset {args.preset}, G = {args.genes}, {args.threads} thread(s), "
          f"median {statistics.median(times) * 1e3:.2f} ms / step over {args.steps} steps")


if __name__ == "__main__":
    main()
