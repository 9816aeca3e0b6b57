"""The numbers and figures of docs/TUTORIAL_own_cells.md: Kang 2018 IFN-beta PBMCs, one cell type's stimulated
cells held out of training, its response predicted from its control cells alone (``predict RUN --controls``).

    OMP_NUM_THREADS=1 python benchmarks/tutorial_kang.py --out /work/scratch/tutorial [--steps 3000]
        [--holdout "CD14+ Monocytes"] [--preset tiny] [--figures docs/figures] [--reuse]

Writes under --out: the three input files, prep.h5ad, split.json, run/, pred.h5ad, numbers.json and the figures
(copied to --figures when given). Every step that a user would type is run through the CLI and printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import PerturbDiff, log2_fold_changes
from perturbdiff.cli import main
from perturbdiff.data import Split, apply_record
from perturbdiff.datasets import read_h5ad

KANG = "/work/shared/data/kang2018_ifnb_counts.h5ad"
PERT, CONTROL, STIM, CELL_TYPE = "condition", "control", "stimulated", "cell_type"
USER_COL = "my_cell_type"  # the user's own name for the context column
UNSEEN = "monocytes (my lab)"  # the same cells under a label the run never saw: the <unknown> context token
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "MX1", "ISG20", "IFITM3", "OAS1", "LY6E", "IFI44L", "RSAD2",
        "CXCL10", "APOBEC3A", "IFI27", "MX2"]


def cli(*args: str) -> None:
    """Run one `perturbdiff` command in-process, printed as the user would type it."""
    print("$ perturbdiff " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    rc = main(list(args))
    if rc != 0:
        raise SystemExit(f"perturbdiff {args[0]} failed with exit code {rc}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def write_inputs(out: Path, holdout: str) -> None:
    """training.h5ad (all but the held-out stimulated cells), my_controls.h5ad (its controls, the user's column
    name, no perturbation column) and held_out_stimulated.h5ad (kept aside for the comparison only)."""
    adata = read_h5ad(KANG)
    adata.obs = adata.obs[[PERT, CELL_TYPE]].astype(str)
    is_ho, is_stim = (adata.obs[CELL_TYPE] == holdout).to_numpy(), (adata.obs[PERT] == STIM).to_numpy()
    adata[~(is_ho & is_stim)].copy().write_h5ad(out / "training.h5ad")
    mine = adata[is_ho & ~is_stim].copy()
    mine.obs = mine.obs[[CELL_TYPE]].rename(columns={CELL_TYPE: USER_COL})
    mine.write_h5ad(out / "my_controls.h5ad")
    mine.obs[USER_COL] = UNSEEN
    mine.write_h5ad(out / "my_controls_unseen_label.h5ad")
    adata[is_ho & is_stim].copy().write_h5ad(out / "held_out_stimulated.h5ad")
    print(f"{adata.n_obs} cells; held out {int((is_ho & is_stim).sum())} stimulated {holdout}; "
          f"{int((is_ho & ~is_stim).sum())} of its control cells are the user's input")


def write_split(out: Path) -> None:
    """Every cell type with stimulated cells is training; nothing is validated (fixed step budget)."""
    prep = read_h5ad(out / "prep.h5ad", backed=True)
    obs = prep.obs[[CELL_TYPE, PERT]].astype(str).drop_duplicates()
    train = sorted(((ct,), STIM) for ct in obs.loc[obs[PERT] == STIM, CELL_TYPE])
    Split(name="kang_own_cells", pert_col=PERT, control=CONTROL, context_cols=[CELL_TYPE], train=train, val=[],
          test=[], dataset="kang2018", source=KANG).write(out / "split.json")


def in_layout(stim: AnnData, ctrl: AnnData, ctx_col: str, uns: dict) -> AnnData:
    """Real stimulated + control cells in the prediction layout, so log2_fold_changes treats both alike."""
    X = sp.vstack([sp.csr_matrix(stim.X), sp.csr_matrix(ctrl.X)]).tocsr()
    obs = pd.DataFrame({ctx_col: np.concatenate([stim.obs[ctx_col], ctrl.obs[ctx_col]]).astype(str),
                        PERT: [STIM] * stim.n_obs + [CONTROL] * ctrl.n_obs,
                        "sample": [0] * stim.n_obs + [-1] * ctrl.n_obs,
                        "predicted": [True] * stim.n_obs + [False] * ctrl.n_obs})
    obs.index = obs.index.astype(str)
    out = AnnData(X=X, obs=obs, var=pd.DataFrame(index=stim.var_names.copy()))
    lay = {"context_keys": [ctx_col], "pert_key": PERT, "control": CONTROL, "dose_key": None}
    out.uns["perturbdiff"] = {**uns, "apply": json.dumps(lay)}
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors."""
    return float(np.corrcoef(a, b)[0, 1])


def scores(pred: AnnData, real: AnnData, ctx: str, base: tuple | None = None) -> tuple[dict, dict]:
    """Predicted vs real log2 fold changes (all genes, top 100 real) and log1p mean shifts against the controls."""
    is_pred = pred.obs["predicted"].to_numpy(bool)
    real_lay = in_layout(real, pred[~is_pred], USER_COL, dict(pred.uns["perturbdiff"]))
    lfc_pred = log2_fold_changes(pred).loc[(ctx, STIM)].to_numpy()
    lfc_real = log2_fold_changes(real_lay).loc[(ctx, STIM)].to_numpy()
    ctrl_mean = np.asarray(pred[~is_pred].X.mean(0)).ravel()
    d_pred = np.asarray(pred[is_pred].X.mean(0)).ravel() - ctrl_mean
    d_real = np.asarray(real.X.mean(0)).ravel() - ctrl_mean
    top = np.argsort(-np.abs(lfc_real))[:100]
    nums = {"pearson_lfc_all_genes": pearson(lfc_pred, lfc_real),
            "pearson_lfc_top100_real": pearson(lfc_pred[top], lfc_real[top]),
            "pearson_delta_log1p": pearson(d_pred, d_real),
            "response_size_ratio": float(np.dot(d_pred, d_real) / np.dot(d_real, d_real))}  # slope through 0
    if base is not None:
        lfc_base, d_base = base
        nums.update(baseline_pearson_lfc_all_genes=pearson(lfc_base, lfc_real),
                    baseline_pearson_lfc_top100_real=pearson(lfc_base[top], lfc_real[top]),
                    baseline_pearson_delta_log1p=pearson(d_base, d_real),
                    baseline_response_size_ratio=float(np.dot(d_base, d_real) / np.dot(d_real, d_real)))
    return nums, {"lfc_pred": lfc_pred, "lfc_real": lfc_real}


def baseline(out: Path, holdout: str, uns: dict) -> tuple[np.ndarray, np.ndarray]:
    """The 'mean response of the other cell types' baseline: their real log2 fold changes and log1p mean shifts,
    averaged over the training cell types."""
    prep = read_h5ad(out / "prep.h5ad")
    tr = prep[(prep.obs[CELL_TYPE].astype(str) != holdout).to_numpy()]
    stim, ctrl = tr[(tr.obs[PERT] == STIM).to_numpy()], tr[(tr.obs[PERT] == CONTROL).to_numpy()]
    lfc = log2_fold_changes(in_layout(stim, ctrl, CELL_TYPE, uns)).to_numpy().mean(0)
    types = sorted(set(stim.obs[CELL_TYPE].astype(str)))
    delta = [np.asarray(stim[(stim.obs[CELL_TYPE] == t).to_numpy()].X.mean(0)).ravel()
             - np.asarray(ctrl[(ctrl.obs[CELL_TYPE] == t).to_numpy()].X.mean(0)).ravel() for t in types]
    return lfc, np.mean(delta, axis=0)


def analyse(out: Path, holdout: str) -> tuple[dict, dict]:
    """Scores of the prediction (known context) and of the one through the <unknown> context token; ISG table."""
    pred = read_h5ad(out / "pred.h5ad")
    record = PerturbDiff.load(out / "run", which="last").record
    real = apply_record(read_h5ad(out / "held_out_stimulated.h5ad"), record, input_kind="counts")
    real.obs[USER_COL] = real.obs[CELL_TYPE]
    is_pred = pred.obs["predicted"].to_numpy(bool)
    lfc_base, d_base = baseline(out, holdout, dict(pred.uns["perturbdiff"]))
    nums, data = scores(pred, real, holdout, (lfc_base, d_base))
    unknown = read_h5ad(out / "pred_unknown_context.h5ad")
    real_u = real.copy()
    real_u.obs[USER_COL] = UNSEEN
    nums["unknown_context"], _ = scores(unknown, real_u, UNSEEN)
    genes = list(pred.var_names)
    isgs = [g for g in ISGS if g in genes]
    nums = {"holdout": holdout, "n_controls": int((~is_pred).sum()), "n_predicted": int(is_pred.sum()),
            "n_real_stimulated": int(real.n_obs), "n_genes": len(genes), **nums,
            "isgs_not_in_genes": [g for g in ISGS if g not in genes],
            "isg_lfc": {g: {"predicted": float(data["lfc_pred"][genes.index(g)]),
                            "real": float(data["lfc_real"][genes.index(g)]),
                            "baseline": float(lfc_base[genes.index(g)])} for g in isgs}}
    return nums, {**data, "genes": genes, "isgs": isgs, "pred": pred, "real": real}


def figures(out: Path, nums: dict, data: dict) -> list[Path]:
    """Three small PNGs: ISG fold changes, predicted vs real LFC over all genes, PCA of the three populations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    paths = [out / f"own_cells_{n}.png" for n in ("isg", "lfc_scatter", "pca")]
    isg = nums["isg_lfc"]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    x = np.arange(len(isg))
    bars = (("real", "#444444"), ("predicted", "#d95f02"), ("baseline", "#bbbbbb"))
    for k, (name, color) in enumerate(bars):
        label = "mean of the other cell types" if name == "baseline" else name
        ax.bar(x + (k - 1) * 0.27, [v[name] for v in isg.values()], 0.27, label=label, color=color)
    ax.set_xticks(x, list(isg), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("log2 fold change vs control")
    ax.set_title(f"Interferon-stimulated genes, held-out {nums['holdout']}", fontsize=9)
    top = max(max(v.values()) for v in isg.values())
    ax.set_ylim(min(0.0, min(min(v.values()) for v in isg.values())) - 0.2, top * 1.3)
    ax.legend(fontsize=7, frameon=False, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.scatter(data["lfc_real"], data["lfc_pred"], s=3, alpha=0.4, color="#1b9e77", lw=0)
    for g in [g for g in ("ISG15", "CXCL10", "IFI27", "ISG20") if g in data["isgs"]]:
        i = data["genes"].index(g)
        ax.annotate(g, (data["lfc_real"][i], data["lfc_pred"][i]), fontsize=6, xytext=(-28, 4),
                    textcoords="offset points")
    lim = [min(data["lfc_real"].min(), data["lfc_pred"].min()), max(data["lfc_real"].max(), data["lfc_pred"].max())]
    ax.plot(lim, lim, lw=0.6, color="grey")
    ax.set_xlabel("real log2 fold change")
    ax.set_ylabel("predicted log2 fold change")
    ax.set_title(f"{nums['n_genes']} genes, Pearson r = {nums['pearson_lfc_all_genes']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    pred, real = data["pred"], data["real"]
    is_pred = pred.obs["predicted"].to_numpy(bool)
    groups = {"control": pred[~is_pred].X, "real stimulated": real.X, "predicted stimulated": pred[is_pred].X}
    mats = [np.asarray(m.todense() if sp.issparse(m) else m) for m in groups.values()]
    pcs = PCA(2, random_state=0).fit(np.vstack(mats))
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    rng = np.random.default_rng(0)
    for (name, color), m in zip(zip(groups, ("#7570b3", "#444444", "#d95f02")), mats):
        keep = rng.permutation(len(m))[:800]
        xy = pcs.transform(m[keep])
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.5, color=color, lw=0, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, frameon=False, markerscale=3)
    ax.set_title(f"{nums['holdout']}: PCA on all three", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=90)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_inputs(out, args.holdout)
    if not (args.reuse and (out / "run" / "last.safetensors").exists()):
        cli("preprocess", str(out / "training.h5ad"), "--pert-key", PERT, "--control-value", CONTROL,
            "--context-keys", CELL_TYPE, "--input-kind", "counts", "--n-hvg", "2000", "--out", str(out / "prep.h5ad"))
        write_split(out)
        cli("train", str(out / "prep.h5ad"), "--split", str(out / "split.json"), "--preset", args.preset,
            "--max-steps", str(args.steps), "--device", "cpu", "--no-progress", "--out", str(out / "run"))
    t_train = time.perf_counter()
    cli("predict", str(out / "run"), "--controls", str(out / "my_controls.h5ad"), "--perturbations", STIM,
        "--context-keys", USER_COL, "--input-kind", "counts", "--device", "cpu", "--no-progress",
        "--out", str(out / "pred.h5ad"))
    t_pred = time.perf_counter()
    cli("predict", str(out / "run"), "--controls", str(out / "my_controls_unseen_label.h5ad"), "--perturbations",
        STIM, "--context-keys", USER_COL, "--input-kind", "counts", "--device", "cpu", "--no-progress",
        "--out", str(out / "pred_unknown_context.h5ad"))
    cli("info", str(out / "run"))
    nums, data = analyse(out, args.holdout)
    timing = {"seconds_total": round(time.perf_counter() - t0), "seconds_train": round(t_train - t0)}
    if args.reuse and (out / "numbers.json").exists():  # keep the timing of the run that trained
        timing = {k: json.loads((out / "numbers.json").read_text()).get(k) for k in timing}
    nums.update(preset=args.preset, steps=args.steps, seconds_predict=round(t_pred - t_train), **timing)
    (out / "numbers.json").write_text(json.dumps(nums, indent=1) + "\n")
    paths = figures(out, nums, data)
    if args.figures:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(args.figures) / p.name)
    print(json.dumps(nums, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (never inside the repository)")
    parser.add_argument("--holdout", default="CD14+ Monocytes", help="cell type whose stimulated cells are held out")
    parser.add_argument("--preset", default="tiny", help="model size preset")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--figures", help="copy the PNGs here (e.g. docs/figures)")
    parser.add_argument("--reuse", action="store_true", help="keep an existing run in --out (no preprocess/train)")
    run(parser.parse_args())
