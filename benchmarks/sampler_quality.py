"""Does sampling with fewer network evaluations keep the quality? One trained run, several samplers, cell-eval.

    python benchmarks/sampler_quality.py --run RUN_DIR --split kang_celltype \
        --samplers truncated:99,truncated:49,full:50,full:25,full:10
    python benchmarks/sampler_quality.py --run FLOW_RUN_DIR --split kang_celltype --samplers euler:1,euler:4,heun:2

A sampler is ``start:n`` for VP diffusion (the truncated start t, n + 1 evaluations, or n full-DDIM steps) or
``solver:n`` for a flow-matching run (euler, heun, rk4, dopri5 with n steps). Each sampler predicts the split's test
conditions (test_n_cells each, same seed) with the run's weights; the table gives the predict time (ratios inside one
run are what to read) and the headline metrics of real_benchmark.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare, score  # noqa: E402

HEAD = ["pr_auc", "roc_auc", "pearson_delta", "r2", "discrimination_score_l2", "mse"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of a trained model")
    p.add_argument("--split", default="kang_celltype", help="benchmark split the run was trained on")
    p.add_argument("--samplers", default="truncated:99,truncated:49,full:50,full:25,full:10",
                   help="start:n (VP: truncated start t or full-DDIM steps) or solver:n (flow: euler, heun, rk4, "
                        "dopri5)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--subset", default="test", choices=["val", "test"],
                   help="conditions to predict and score: choose samplers on val, report on test")
    p.add_argument("--work", default="bench_work", help="where real_benchmark.py caches the preprocessed data")
    args = p.parse_args()

    from perturbdiff import PerturbDiff
    from perturbdiff.config import Config

    prep, split, _ = prepare(args.split, Path(args.work), SHARED)
    model = PerturbDiff.load(args.run, adata=prep)
    print("| sampler | network evals | predict s | " + " | ".join(HEAD) + " |")
    print("|---|---|---|" + "---|" * len(HEAD))
    for spec in args.samplers.split(","):
        start, n = spec.split(":")
        n = int(n)
        if start in ("full", "truncated"):
            changes = {"sample.start": start}
            changes["sample.truncated_start_t" if start == "truncated" else "sample.steps"] = n
        else:
            changes = {"sample.solver": start, "sample.steps": n}
        model.cfg = Config.from_dict(model.cfg.to_dict()).update(changes)
        t0 = time.perf_counter()
        pred = model.predict(subset=args.subset, seed=args.seed, progress=False)
        secs = time.perf_counter() - t0
        table, _ = score({"m": pred}, prep, split, args.subset)
        row = table.loc["m"]
        evals = model.process.evaluations(model.cfg.sample)
        evals = evals if evals > 0 else "adaptive"
        print(f"| {spec} | {evals} | {secs:.1f} | " + " | ".join(f"{row[h]:.3f}" for h in HEAD) + " |", flush=True)


if __name__ == "__main__":
    main()
