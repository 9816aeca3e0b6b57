"""PerturbDiff's default `perturbdiff train` + `predict` and STATE's small configuration back to back, in one run:
wall time, peak memory and quality of each (the protocol of shared/benchmarks/README.md), and their ratio.

    python benchmarks/vs_state.py --split kang_celltype --state-venv /path/to/state-venv [--steps 5000,2000]
    python benchmarks/vs_state.py ... --variant b16:data.batch_sets=16,train.max_steps=2500  # a lever beside them

STATE (arc-state 0.11.1) lives in a venv of its own (shared/benchmarks/STATE.md says how to make it); it is run with
the command lines of STATE.md. Both contenders see the same cells: the split's training conditions, every control
cell, and the validation condition(s); STATE's TOML holds the val / test perturbations of each held-out context.
Each command runs in its own process, timed from outside; its peak RSS comes from the wrapper's RUSAGE_CHILDREN.
Thread settings are left as they are for both (PerturbDiff's `--threads auto`, STATE's torch default) unless the
environment sets OMP_NUM_THREADS. Results: <work>/<split>/vs_state/result.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare, score  # noqa: E402

BATCH_COL = "state_batch"
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (its output into ``log``); (wall seconds, peak RSS MiB). Stops the script if it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    peak = [ln for ln in log.read_text().splitlines() if ln.startswith("PEAK_KB")][-1]
    return wall, int(peak.split()[1]) / 1024


def measured(out: Path, reuse: bool, run) -> dict:
    """``run(out)`` -> {fit_s, predict_s, peak_mb}, kept in out/timing.json; with ``reuse`` an earlier timing stands.
    Adds the prediction's path."""
    path = out / "timing.json"
    if reuse and path.exists():
        timing = json.loads(path.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        timing = run(out)
        path.write_text(json.dumps(timing))
    return {**timing, "pred": out / "pred.h5ad"}


def run_perturbdiff(prep_path: Path, split_path: Path, out: Path, steps: int | None, seed: int,
                    sets: tuple[str, ...] = ()) -> dict:
    run, pred = out / "run", out / "pred.h5ad"
    train = [sys.executable, "-m", "perturbdiff.cli", "train", str(prep_path), "--split", str(split_path), "--out",
             str(run), "--seed", str(seed), "--no-resume", "--no-progress"]
    if steps:
        train += ["--max-steps", str(steps)]
    for item in sets:
        train += ["--set", item]
    fit_s, fit_mb = timed(train, out / "train.log")
    pred_s, pred_mb = timed([sys.executable, "-m", "perturbdiff.cli", "predict", str(run), "--data", str(prep_path),
                             "--out", str(pred), "--seed", str(seed), "--no-progress"], out / "predict.log")
    return {"fit_s": fit_s, "predict_s": pred_s, "peak_mb": max(fit_mb, pred_mb)}


def state_inputs(prep, split, work: Path, seed: int) -> tuple[Path, Path, Path, Path]:
    """STATE.md's inputs: data folder, perturbation features, TOML split, and the control cells to predict from."""
    import anndata as ad
    import scipy.sparse as sp
    import torch

    pc, cc = split.pert_col, split.context_cols[0]
    ds = split.name
    obs = prep.obs
    conds = {(str(c[0][0]), str(c[1])) for c in [*split.train, *split.val, *split.test]}
    keep = (obs[pc].astype(str) == split.control).to_numpy() | np.array(
        [(str(a), str(b)) in conds for a, b in zip(obs[cc], obs[pc])])
    X = prep.X[keep]
    dense = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    o = pd.DataFrame({pc: obs[pc].astype(str).to_numpy()[keep], cc: obs[cc].astype(str).to_numpy()[keep],
                      BATCH_COL: "b0"}, index=[f"c{i}" for i in range(int(keep.sum()))])
    var = pd.DataFrame({"gene_name": list(prep.var_names)})
    var.index = [str(i) for i in range(len(var))]
    data = ad.AnnData(X=dense, obs=o, var=var, obsm={"X_hvg": dense}, uns={"log1p": {"base": None}})
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    data.write_h5ad(folder / f"{ds}.h5ad")

    labels = sorted(set(o[pc]))
    tokens = sorted({part for lab in labels for part in lab.split("+")})
    feats = {lab: torch.zeros(len(tokens)) for lab in labels}
    for lab in labels:
        for part in lab.split("+"):
            feats[lab][tokens.index(part)] = 1.0  # a double A+B is e_A + e_B
    torch.save(feats, work / "pert_features.pt")

    held: dict[str, dict[str, list[str]]] = {}
    for name, conds_ in (("val", split.val), ("test", split.test)):
        for ctx, pert in conds_:
            held.setdefault(str(ctx[0]), {"val": [], "test": []})[name].append(str(pert))
    lines = [f'[datasets]\n{ds} = "{folder}/"\n', f'[training]\n{ds} = "train"\n']
    for ctx, parts in held.items():
        lines.append(f'[fewshot."{ds}.{ctx}"]\nval = {json.dumps(parts["val"])}\ntest = {json.dumps(parts["test"])}\n')
    toml = work / "split.toml"
    toml.write_text("\n".join(lines))

    rng = np.random.default_rng(seed)
    blocks = []  # STATE's virtual experiment takes each group's basal cells from the control rows of the input
    for ctx in dict.fromkeys(str(c[0][0]) for c in split.test):
        blocks.append(data[np.flatnonzero((o[cc] == ctx).to_numpy() & (o[pc] == split.control).to_numpy())].copy())
    for (ctx, pert), n in zip(split.test, split.test_n_cells):
        pool = np.flatnonzero((o[cc] == str(ctx[0])).to_numpy() & (o[pc] == split.control).to_numpy())
        rows = rng.choice(pool, size=int(n), replace=len(pool) < n)
        b = data[rows].copy()
        b.obs[pc] = str(pert)
        blocks.append(b)
    infer_in = work / "infer_in.h5ad"
    inp = ad.concat(blocks, index_unique="-")
    inp.obs_names_make_unique()
    inp.var = var
    inp.uns["log1p"] = {"base": None}
    inp.write_h5ad(infer_in)
    return folder, work / "pert_features.pt", toml, infer_in


def run_state(prep, split, out: Path, venv: Path, steps: int, seed: int) -> dict:
    import anndata as ad
    import scipy.sparse as sp

    _, feats, toml, infer_in = state_inputs(prep, split, out, seed)
    state = str(venv / "bin" / "state")
    pc, cc = split.pert_col, split.context_cols[0]
    train = [state, "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
             "data.kwargs.output_space=gene", f"data.kwargs.pert_col={pc}", f"data.kwargs.cell_type_key={cc}",
             f"data.kwargs.batch_col={BATCH_COL}", f"data.kwargs.control_pert={split.control}",
             f"data.kwargs.perturbation_features_file={feats}", "data.kwargs.num_workers=0",
             "data.kwargs.pin_memory=false", "use_wandb=false", f"output_dir={out}", "name=run", "model=state_sm",
             "model.kwargs.cell_set_len=32", "model.kwargs.hidden_dim=128",
             "model.kwargs.transformer_backbone_kwargs.intermediate_size=512",
             "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=4",
             "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
             "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
             "model.kwargs.transformer_backbone_kwargs.head_dim=32", f"training.max_steps={steps}",
             "training.batch_size=8", "training.val_freq=500", f"training.ckpt_every_n_steps={steps}"]
    if (out / "run").exists():  # STATE resumes a finished run instead of training: its time would be wrong
        sys.exit(f"{out / 'run'} exists: remove it to measure STATE again (or pass --reuse to keep its numbers)")
    fit_s, fit_mb = timed(train, out / "train.log")
    infer_out = out / "infer_out.h5ad"
    infer = [state, "tx", "infer", "--model-dir", str(out / "run"), "--checkpoint",
             str(out / "run" / "checkpoints" / "final.ckpt"), "--adata", str(infer_in), "--embed-key", "X_hvg",
             "--pert-col", pc, "--celltype-col", cc, "--batch-col", BATCH_COL, "--output", str(infer_out)]
    pred_s, pred_mb = timed(infer, out / "infer.log")
    res = ad.read_h5ad(infer_out)
    keep = (res.obs[pc].astype(str) != split.control).to_numpy()
    X = np.clip(np.asarray(res.obsm["X_hvg"])[keep], 0, None).astype(np.float32)
    obs = res.obs.loc[keep, [pc, cc]].astype(str).astype("category")
    pred = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=list(prep.var_names)))
    pred.write_h5ad(out / "pred.h5ad")
    return {"fit_s": fit_s, "predict_s": pred_s, "peak_mb": max(fit_mb, pred_mb)}


HEAD = ["pr_auc", "roc_auc", "overlap_at_N", "pearson_delta", "r2", "mse"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="kang_celltype")
    ap.add_argument("--state-venv", required=True, type=Path, help="the venv holding arc-state 0.11.1")
    ap.add_argument("--steps", default="default",
                    help="PerturbDiff budgets to run, comma-separated (default = the default configuration's own: "
                         "preset tiny's steps)")
    ap.add_argument("--state-steps", type=int, default=2000, help="STATE's max_steps (PEERS.md: 2,000)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="one more PerturbDiff contender, the default with these config values (repeatable), e.g. "
                         "b16:data.batch_sets=16,train.max_steps=2500")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="bench_work", type=Path)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs already measured in the work folder (their timing.json)")
    args = ap.parse_args()
    import anndata as ad

    prep, split, _ = prepare(args.split, args.work, Path(args.shared))
    root = args.work / args.split / "vs_state" / f"seed{args.seed}"
    root.mkdir(parents=True, exist_ok=True)
    prep_path = args.work / args.split / "prep.h5ad"
    split_path = Path(args.shared) / "benchmarks" / f"{args.split}.json"
    runs: dict[str, dict] = {}
    for steps in args.steps.split(","):
        name = "perturbdiff" if steps == "default" else f"perturbdiff-{steps}"
        budget = None if steps == "default" else int(steps)
        runs[name] = measured(root / name, args.reuse,
                              lambda out, b=budget: run_perturbdiff(prep_path, split_path, out, b, args.seed))
        print(f"{name}: {runs[name]['fit_s']:.0f} s fit, {runs[name]['predict_s']:.0f} s predict", flush=True)
    for spec in args.variant:
        label, _, items = spec.partition(":")
        if not label or not items or any("=" not in i for i in items.split(",")):
            sys.exit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        name, sets = f"perturbdiff-{label}", tuple(items.split(","))
        runs[name] = measured(root / name, args.reuse, lambda out, s=sets:
                              run_perturbdiff(prep_path, split_path, out, None, args.seed, s))
        print(f"{name}: {runs[name]['fit_s']:.0f} s fit, {runs[name]['predict_s']:.0f} s predict", flush=True)
    runs["state"] = measured(root / "state", args.reuse,
                             lambda out: run_state(prep, split, out, args.state_venv, args.state_steps, args.seed))
    print(f"state: {runs['state']['fit_s']:.0f} s fit, {runs['state']['predict_s']:.0f} s predict", flush=True)
    table, _ = score({k: ad.read_h5ad(v["pred"]) for k, v in runs.items()}, prep, split)
    result = {k: {**{m: float(table.loc[k, m]) for m in HEAD if m in table.columns},
                  **{m: v[m] for m in ("fit_s", "predict_s", "peak_mb")}} for k, v in runs.items()}
    (root / "result.json").write_text(json.dumps(result, indent=1))
    st = result["state"]["fit_s"] + result["state"]["predict_s"]
    print("| contender | fit + predict s | ratio to STATE | peak MiB | " + " | ".join(HEAD) + " |")
    print("|---" * (4 + len(HEAD)) + "|")
    for k, r in result.items():
        total = r["fit_s"] + r["predict_s"]
        print(f"| {k} | {total:.0f} | {total / st:.2f} | {r['peak_mb']:.0f} | "
              + " | ".join(f"{r.get(m, float('nan')):.3f}" for m in HEAD) + " |")


if __name__ == "__main__":
    main()
