"""Where a real training run's time goes: the default's loop on a benchmark split, each part of a step timed.

    OMP_NUM_THREADS=1 python benchmarks/loop_parts.py --split kang_celltype --steps 600 [--set data.num_workers=1]

Trains the default configuration (``Config.default()``, no validation) for ``--steps`` steps on the split's training
conditions through the package's own Trainer, with a timer around each of its parts: loss + backward, the loader's
gather (``CellSetDataset.__getitems__``), gradient clipping and the EMA update. Prints ms per step for each, the
whole step and the wall time per step (set-up included), under the path of the package timed, so two commits
compare by alternating ``PYTHONPATH=old/src`` and ``new/src`` (docs/PERFORMANCE.md, "The training loop's overheads").
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perturbdiff  # noqa: E402
from perturbdiff import Config, PerturbDiff  # noqa: E402
from perturbdiff.data import CellSetDataset  # noqa: E402
from perturbdiff.train import EMA, Trainer  # noqa: E402
from real_benchmark import SHARED, prepare  # noqa: E402

PARTS = ((Trainer, "train_step", "step"), (Trainer, "_loss_and_backward", "loss + backward"),
         (CellSetDataset, "__getitems__", "loader gather"), (torch.nn.utils, "clip_grad_norm_", "clipping"),
         (EMA, "update", "EMA"))


def timed_parts() -> dict[str, float]:
    """Wrap each part in a timer; returns the dict the seconds accumulate in."""
    spent: dict[str, float] = collections.defaultdict(float)

    def wrap(owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(owner, name, timed)

    for owner, name, key in PARTS:
        wrap(owner, name, key)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="kang_celltype")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config change (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("bench_work"), help="real_benchmark.py's working folder")
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args()
    perturbdiff.set_threads(args.threads)  # a fixed count: no auto measurement inside the timed parts
    prep, split, _ = prepare(args.split, args.work, args.shared)
    cfg = Config.default().update({"train.max_steps": args.steps, "train.val_every": 10**9,
                                   "train.val_guidance": ""}).with_items(args.set)
    model = PerturbDiff.from_config(cfg, prep, split)
    spent = timed_parts()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        model.train(max_steps=args.steps, out_dir=out, progress=False, resume=False, device="cpu")
        wall = time.perf_counter() - t0
    ms = {k: round(v / args.steps * 1e3, 2) for k, v in spent.items()}
    print(Path(perturbdiff.__file__).parent, args.split, f"{args.threads} thread(s)", args.set or "",
          "ms per step:", ms, "wall", round(wall / args.steps * 1e3, 2))


if __name__ == "__main__":
    main()
