"""PerturbDiff and the baselines on the shared benchmark splits, with the protocol of shared/benchmarks/README.md.

    python benchmarks/real_benchmark.py run --split kang_celltype --preset small --steps 3000 --seeds 0,1,2
    python benchmarks/real_benchmark.py report            # docs/BENCHMARKS.md tables from every run so far

Per split: preprocess the source once (exactly the split's var_names), fit + score the baselines once, then per
seed train PerturbDiff, predict the test conditions (test_n_cells each) and score with cell-eval 0.8.2 per context
+ R². Results land in --work (default ./bench_work, never committed) as JSON, one file per (split, tag, seed).
Not a test: a kang run takes tens of minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

# cell-eval's DE tests (numba) run in this process between trainings; with OpenMP's default spinning wait a leftover
# thread kept a core busy and slowed the next training 30x on a 2-core machine (docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPLITS = Path(__file__).resolve().parent / "splits"  # splits of this project (the shared ones are in SHARED)
INPUT_KIND = {"kang": "counts", "devel": "log1p"}


def read_split(split_name: str, shared: Path):
    """The split named ``split_name``: shared/benchmarks/ first, then ours (benchmarks/splits/)."""
    from perturbdiff.data import Split

    path = shared / "benchmarks" / f"{split_name}.json"
    return Split.read(path if path.exists() else SPLITS / f"{split_name}.json")


def prepare(split_name: str, work: Path, shared: Path):
    """(preprocessed AnnData restricted to the split's var_names, split, keys); cached under work/."""
    import anndata as ad

    from perturbdiff._io import atomic_write
    from perturbdiff.data import DataKeys, preprocess, register

    split = read_split(split_name, shared)
    keys = DataKeys(split.pert_col, split.control, tuple(split.context_cols), INPUT_KIND[split.dataset])
    cache = work / split_name / "prep.h5ad"
    if cache.exists():
        return ad.read_h5ad(cache), split, keys
    raw = ad.read_h5ad(shared / split.source)
    register(raw, keys)
    prep = preprocess(raw, keys, var_names=split.var_names)
    atomic_write(cache, prep.write_h5ad)
    return prep, split, keys


def score(preds: dict, prep, split, subset: str = "test") -> tuple[pd.DataFrame, dict]:
    from perturbdiff.evaluate import build_real, context_column, evaluate_predictions

    real, ctx = context_column(build_real(prep, split, subset), split.context_cols)
    preds = {k: context_column(v, split.context_cols)[0] for k, v in preds.items()}
    return evaluate_predictions(preds, real, pert_col=split.pert_col, control=split.control, context_col=ctx,
                                num_threads=2, return_per_condition=True)


def run_baselines(args, prep, split, keys, out: Path) -> None:
    """Every registered baseline not yet in out/baselines.json (so a baseline added later is scored once too); the
    knn baseline in its default table, the knowledge prior's HPO embedding (k = 5)."""
    from perturbdiff._io import atomic_write_json
    from perturbdiff.baselines import BASELINES, make_baseline

    path = out / "baselines.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    todo = [n for n in BASELINES if n not in rows]
    if not todo:
        return
    preds, secs = {}, {}
    for name in todo:
        t0 = time.perf_counter()
        baseline = make_baseline(name, unseen="zero").fit(prep, split, keys)  # unseen: no effect (PEERS.md)
        preds[name] = baseline.predict(split.test, split.test_n_cells, 0)
        secs[name] = time.perf_counter() - t0
    table, _ = score(preds, prep, split)
    rows |= {n: {**table.loc[n].to_dict(), "fit_pred_s": secs[n]} for n in table.index}
    atomic_write_json(path, rows)


def run_model(args, prep, split, seed: int, out: Path) -> dict:
    from perturbdiff import Config, PerturbDiff
    cfg = Config.from_preset(args.preset).update({"train": {"max_steps": args.steps, "seed": seed}})
    cfg = cfg.with_items(args.set)
    t0 = time.perf_counter()
    model = PerturbDiff.from_config(cfg, prep, split).train(out_dir=out / "run", progress=False, resume=False)
    t_train = time.perf_counter() - t0
    model = PerturbDiff.load(out / "run", adata=prep, which=args.checkpoint)
    t0 = time.perf_counter()
    pred = model.predict(subset="test", seed=seed, progress=False, guidance=args.guidance,
                         start=args.start, steps=args.sampler_steps, solver=args.solver,
                         unknown_perturbations=args.unknown_perturbations)
    t_pred = time.perf_counter() - t0
    table, per = score({"perturbdiff": pred}, prep, split)
    spread = _spread(pred, prep, split)
    return {**table.loc["perturbdiff"].to_dict(), "train_s": t_train, "predict_s": t_pred, "spread_ratio": spread,
            "config": cfg.to_dict(), "checkpoint": args.checkpoint,
            "routes": json.loads(pred.uns["perturbdiff"]["routes"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _spread(pred, prep, split) -> float:
    """Median over test conditions of (per-gene SD of predicted cells) / (per-gene SD of real cells)."""
    from perturbdiff.data import condition_codes

    ratios = []
    ctx_col = split.context_cols[0]
    code, present = condition_codes(prep, _keys(split))
    for ctx, pert in split.test:
        m_pred = ((pred.obs[split.pert_col] == pert) & (pred.obs[ctx_col] == ctx[0])).to_numpy()
        m_real = code == present.index((ctx, pert))
        sd_p = pred.X[m_pred].toarray().std(0)
        sd_r = prep.X[m_real].toarray().std(0)
        ok = sd_r > 0
        ratios.append(float(np.median(sd_p[ok] / sd_r[ok])))
    return float(np.median(ratios))


def _keys(split):
    from perturbdiff.data import DataKeys

    return DataKeys(split.pert_col, split.control, tuple(split.context_cols), "log1p")


def cmd_run(args) -> None:
    work = Path(args.work)
    prep, split, keys = prepare(args.split, work, Path(args.shared))
    out = work / args.split
    out.mkdir(parents=True, exist_ok=True)
    run_baselines(args, prep, split, keys, out)
    for seed in [int(s) for s in args.seeds.split(",")]:
        dest = out / args.tag / f"seed{seed}"
        res = run_model(args, prep, split, seed, dest)
        res["command"] = " ".join(["python benchmarks/real_benchmark.py run", *args._argv])
        (dest / "result.json").write_text(json.dumps(res, indent=1, default=str))
        headline = {k: round(v, 3) for k, v in res.items() if k in COLUMNS and isinstance(v, float)}
        print(f"{args.split} {args.tag} seed {seed}: {headline}", flush=True)


COLUMNS = ["overlap_at_N", "precision_at_N", "de_direction_match", "de_spearman_lfc_sig", "pr_auc", "roc_auc",
           "pearson_delta", "mse", "mae", "discrimination_score_l1", "discrimination_score_l2",
           "discrimination_score_cosine", "r2"]


SHORT = ["overlap@N", "prec@N", "dir", "lfc_rho", "pr_auc", "roc_auc", "pearson_Δ", "mse", "mae", "pds_l1",
         "pds_l2", "pds_cos", "R²"]


def read_peers(shared: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The tables of shared/benchmarks/PEERS.md: {split: {contender: {short metric: value}}}."""
    out: dict = {}
    split = None
    for line in (shared / "benchmarks" / "PEERS.md").read_text().splitlines():
        if line.startswith("## "):
            split = line[3:].strip()
        elif line.startswith("| ") and split and not line.startswith("| contender") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            head = SHORT + ["fit+pred s", "peak MB"]
            if len(cells) == len(head) + 1:
                out.setdefault(split, {})[cells[0]] = {h: _num(v) for h, v in zip(head, cells[1:])}
    return out


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


def _cell(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    if not vals:
        return "—"
    return f"{np.mean(vals):.3f}" if len(vals) == 1 else f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def collect(work: Path) -> dict:
    """{split: {"baselines": {...}, "tags": {tag: [result, ...]}}} from the JSON files under work/."""
    out = {}
    for split_dir in sorted(p for p in work.iterdir() if p.is_dir()):
        entry = {"baselines": {}, "tags": {}}
        if (split_dir / "baselines.json").exists():
            entry["baselines"] = json.loads((split_dir / "baselines.json").read_text())
        for res in sorted(split_dir.glob("*/seed*/result.json")):
            entry["tags"].setdefault(res.parent.parent.name, []).append(json.loads(res.read_text()))
        out[split_dir.name] = entry
    return out


def table_rows(entry: dict, peers: dict) -> list[str]:
    """Markdown rows: PerturbDiff tags (mean ± sd over seeds), our baselines, and the peer STATE."""
    rows = []
    for tag, results in entry["tags"].items():
        cells = [_cell([r.get(c) for r in results]) for c in COLUMNS]
        secs = _cell([r["train_s"] + r["predict_s"] for r in results])
        rows.append(f"| **perturbdiff** `{tag}` (n={len(results)}) | " + " | ".join(cells) + f" | {secs} |")
    for name, r in entry["baselines"].items():
        rows.append(f"| {name} (ours) | " + " | ".join(_cell([r.get(c)]) for c in COLUMNS)
                    + f" | {r['fit_pred_s']:.2f} |")
    for name, r in peers.items():
        if name in ("state",):
            rows.append(f"| {name} (PEERS.md) | " + " | ".join(_cell([r.get(c)]) for c in SHORT)
                        + f" | {r['fit+pred s']:.0f} |")
    return rows


def cmd_report(args) -> None:
    peers = read_peers(Path(args.shared))
    lines = []
    for split, entry in collect(Path(args.work)).items():
        lines += [f"### {split}", "", "| contender | " + " | ".join(SHORT) + " | fit+pred s |",
                  "|---" * (len(SHORT) + 2) + "|", *table_rows(entry, peers.get(split, {})), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train + predict + score one split")
    r.add_argument("--split", required=True, help="kang_celltype, devel_gbm or devel_combo")
    r.add_argument("--preset", default="small", help="model preset")
    r.add_argument("--steps", type=int, default=3000, help="training steps")
    r.add_argument("--seeds", default="0", help="comma-separated training seeds")
    r.add_argument("--set", action="append", default=[], help="config override SECTION.KEY=VALUE (repeatable)")
    r.add_argument("--guidance", type=float, help="sampling guidance w (default: the config's)")
    r.add_argument("--start", choices=["full", "truncated"], help="sampler start (default: the config's)")
    r.add_argument("--sampler-steps", type=int, help="sampler steps (DDIM's for --start full, a flow solver's)")
    r.add_argument("--solver", choices=["euler", "heun", "dopri5", "rk4"], help="a flow run's ODE solver")
    r.add_argument("--checkpoint", default="best", choices=["best", "last"], help="checkpoint to predict with")
    r.add_argument("--unknown-perturbations", default="error", choices=["error", "generic"],
                   help="predict parts never seen in training as the generic perturbation token")
    r.add_argument("--tag", default="default", help="name of this configuration in the results")
    r.add_argument("--work", default="bench_work", help="working folder (not committed)")
    r.add_argument("--shared", default=str(SHARED), help="the shared/ folder with data/ and benchmarks/")
    rep = sub.add_parser("report", help="markdown tables of every result under --work")
    rep.add_argument("--work", default="bench_work", help="working folder of the runs")
    rep.add_argument("--shared", default=str(SHARED), help="the shared/ folder (for PEERS.md)")
    rep.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args()
    args._argv = sys.argv[2:]
    (cmd_run if args.cmd == "run" else cmd_report)(args)


if __name__ == "__main__":
    main()
