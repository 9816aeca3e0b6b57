"""Marginal pretraining on the shared benchmarks: scratch vs pretrained-then-finetuned at low data, and zero-shot.

    python benchmarks/pretrain_benchmark.py pretrain --preset tiny --steps 1500
    python benchmarks/pretrain_benchmark.py run --split kang_celltype --fractions 0.01,0.05,1 --seeds 0,1 --steps 500
    python benchmarks/pretrain_benchmark.py zeroshot --split kang_celltype --seeds 0,1
    python benchmarks/pretrain_benchmark.py report        # markdown tables from every result so far

Pretraining corpus (one run serves both splits): the control cells of kang_celltype's and devel_gbm's preprocessed
data (each split's genes) plus synthetic atlas-like cells (`simulate_atlas`, all cells, their own HVGs). Runs at each
fraction train on that seeded fraction of every training condition's perturbed cells (all conditions kept, all
control cells kept); "scratch" starts from a fresh network, "finetuned" from the pretrained one (--io-layers).
Scoring and splits are those of real_benchmark.py (cell-eval 0.8.2 per context + R²). Results: --work/pretrain/...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import COLUMNS, SHARED, SHORT, prepare, score  # noqa: E402

SPLITS = ("kang_celltype", "devel_gbm")


def _cfg(args, **extra):
    from perturbdiff import Config

    return Config.from_preset(args.preset).update({"train.max_steps": args.steps, "train.val_every": args.steps,
                                                   **extra})


def cmd_pretrain(args) -> None:
    from perturbdiff import Pretrained
    from perturbdiff.data import marginal_source
    from perturbdiff.datasets import simulate_atlas

    work = Path(args.work)
    every = set(args.all_cells.split(",")) if args.all_cells else set()
    sources = [marginal_source(prepare(s, work, Path(args.shared))[0], s.split("_")[0], all_cells=s.split("_")[0]
                               in every) for s in SPLITS]
    atlas = simulate_atlas(args.atlas_cells, 1000, n_cell_types=8, n_batches=4, seed=0)
    sources.append(marginal_source(atlas, "atlas", context_keys=["cell_type"], input_kind="counts", n_hvg=500))
    cfg = _cfg(args, **{"train.seed": 0})
    t0 = time.perf_counter()
    pre = Pretrained.from_sources(cfg, sources)
    pre.train(sources, out_dir=work / "pretrain" / args.pretrained, progress=False, resume=False)
    info = {"train_s": time.perf_counter() - t0, "steps": args.steps, "preset": args.preset,
            "n_genes": len(pre.genes), "datasets": [{k: v for k, v in d.items() if k not in ("genes", "contexts")}
                                                    for d in pre.datasets],
            "sets_per_epoch": len(pre.trainer.loader.dataset), "command": " ".join(sys.argv)}
    (work / "pretrain" / f"{args.pretrained}.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def cmd_run(args) -> None:
    from perturbdiff import PerturbDiff, Pretrained, finetune

    work = Path(args.work)
    prep, split, _ = prepare(args.split, work, Path(args.shared))
    pre = Pretrained.load(work / "pretrain" / args.pretrained) if "finetuned" in args.arms else None
    for frac in [float(f) for f in args.fractions.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in args.arms.split(","):
                label = arm if arm == "scratch" or args.io_layers == "keep" else f"{arm}({args.io_layers})"
                label += args.tag
                dest = work / "pretrain" / args.split / f"{label}-f{frac:g}" / f"seed{seed}"
                if (dest / "result.json").exists():
                    continue
                cfg = _cfg(args, **{"train.seed": seed, "data.fraction": frac})
                t0 = time.perf_counter()
                model = (finetune(pre, cfg, prep, split, io_layers=args.io_layers) if arm == "finetuned"
                         else PerturbDiff.from_config(cfg, prep, split))
                model.train(out_dir=dest / "run", progress=False, resume=False)
                t_train = time.perf_counter() - t0
                model = PerturbDiff.load(dest / "run", adata=prep)
                pred = model.predict(subset="test", seed=seed, progress=False, start=args.start)
                table, _ = score({"m": pred}, prep, split)
                res = {**table.loc["m"].to_dict(), "train_s": t_train, "arm": arm, "fraction": frac, "seed": seed,
                       "io_layers": args.io_layers if arm == "finetuned" else None, "command": " ".join(sys.argv)}
                (dest / "result.json").write_text(json.dumps(res, indent=1, default=str))
                print(f"{args.split} {arm} f={frac:g} seed {seed}: pr_auc {res['pr_auc']:.3f} pearson_delta "
                      f"{res['pearson_delta']:.3f} r2 {res['r2']:.3f} ({t_train:.0f} s)", flush=True)


def cmd_zeroshot(args) -> None:
    import torch

    from perturbdiff import Pretrained

    work = Path(args.work)
    prep, split, _ = prepare(args.split, work, Path(args.shared))
    pre = Pretrained.load(work / "pretrain" / args.pretrained)
    label = "zero-shot"
    if args.untrained:  # the same architecture and vocabulary, freshly initialised: what zero-shot gets for free
        from perturbdiff.nn import Denoiser

        torch.manual_seed(0)
        pre.network = Denoiser(pre.cfg.model, len(pre.genes), pre.vocab.sizes, n_datasets=len(pre.datasets)).eval()
        label = "zero-shot untrained"
    for seed in [int(s) for s in args.seeds.split(",")]:
        dest = work / "pretrain" / args.split / label / f"seed{seed}"
        dest.mkdir(parents=True, exist_ok=True)
        pred = pre.zero_shot(prep, split=split, dataset=args.split.split("_")[0], seed=seed, progress=False)
        table, _ = score({"m": pred}, prep, split)
        res = {**table.loc["m"].to_dict(), "arm": label, "seed": seed, "command": " ".join(sys.argv)}
        (dest / "result.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"{args.split} {label} seed {seed}: pr_auc {res['pr_auc']:.3f} pearson_delta "
              f"{res['pearson_delta']:.3f} r2 {res['r2']:.3f}", flush=True)


def _cell(vals: list[float]) -> str:
    import numpy as np

    vals = [v for v in vals if v == v]  # NaN: undefined for this run (e.g. no DE genes)
    if not vals:
        return "—"
    return f"{np.mean(vals):.3f}" if len(vals) == 1 else f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def cmd_report(args) -> None:
    root = Path(args.work) / "pretrain"
    for split in SPLITS:
        groups: dict[str, list[dict]] = {}
        for f in sorted((root / split).glob("*/seed*/result.json")):
            groups.setdefault(f.parent.parent.name, []).append(json.loads(f.read_text()))
        if not groups:
            continue
        print(f"\n#### {split}\n")
        print("| arm | fraction | seeds | " + " | ".join(SHORT) + " |")
        print("|---|---|---|" + "---|" * len(SHORT))
        order = sorted(groups, key=lambda g: (g.startswith("zero-shot"), float(g.rsplit("-f", 1)[-1]) if "-f" in g
                                              else 0, g))
        for g in order:
            rows = groups[g]
            arm, _, frac = g.partition("-f")
            cells = [_cell([r[c] for r in rows if isinstance(r.get(c), (int, float))]) for c in COLUMNS]
            print(f"| {arm} | {frac or '–'} | {len(rows)} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work", help="results folder (never committed)")
    p.add_argument("--shared", default=str(SHARED), help="the shared folder (data/, benchmarks/)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pretrain", "run", "zeroshot", "report"):
        q = sub.add_parser(name)
        q.add_argument("--preset", default="tiny", help="model size preset")
        q.add_argument("--steps", type=int, default=500, help="optimiser steps per run")
        q.add_argument("--split", choices=SPLITS, default="kang_celltype", help="benchmark split")
        q.add_argument("--fractions", default="0.01,0.05,1", help="fractions of perturbed training cells")
        q.add_argument("--seeds", default="0,1", help="seeds")
        q.add_argument("--arms", default="scratch,finetuned", help="scratch and/or finetuned")
        q.add_argument("--io-layers", default="keep", choices=["keep", "reinit", "task"], help="finetuning layers")
        q.add_argument("--atlas-cells", type=int, default=20_000, help="synthetic atlas cells (pretrain)")
        q.add_argument("--pretrained", default="run", help="name of the pretraining run under WORK/pretrain/")
        q.add_argument("--all-cells", default="", help="pretrain: data sets (kang, devel) whose cells all count")
        q.add_argument("--start", choices=["full", "truncated"],
                       help="run: sampler start (default: the config's; the tables used truncated, the then default)")
        q.add_argument("--tag", default="", help="run: suffix of the arm's label (e.g. -2000steps)")
        q.add_argument("--untrained", action="store_true", help="zeroshot: a freshly initialised network instead")
    args = p.parse_args()
    {"pretrain": cmd_pretrain, "run": cmd_run, "zeroshot": cmd_zeroshot, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
