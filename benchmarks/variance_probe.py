"""Where the spread over seeds comes from, and sampling-only ways to cut it, on validation conditions only.

    python benchmarks/variance_probe.py --work bench_work --split devel_gbm_inner --tag e-def1-5k --probe spread
    python benchmarks/variance_probe.py ... --probe noise       # per-set moment-matched source noise
    python benchmarks/variance_probe.py ... --probe controls    # control sets whose mean is nearest the pool's
    python benchmarks/variance_probe.py ... --probe mixture     # three seeds' sets pooled into one population
    python benchmarks/variance_probe.py ... --probe sampler --variants "steps=50;steps=12;solver=heun;set_size=64"
    python benchmarks/variance_probe.py ... --probe baselines   # the baselines on the same validation conditions
    python benchmarks/variance_probe.py ... --probe anchors     # auto's anchor criterion for routes and their blends

Every probe reads the runs ``seed0..2`` of ``--tag`` (their best checkpoints) and scores the validation conditions
with the test protocol (cell-eval 0.8.2 per context, R²), as ``validation_cell_eval.py`` does.

- ``spread``: each run predicts with three sampling seeds; the table splits the sd of each score into the part
  within a run (sampling: source noise and control-set draws) and the part between runs (training).
- ``noise`` and ``controls`` change the sampler by patching the package at run time (they are probes of
  alternatives, not options of the package): the flow's source noise standardised per gene over each set's cells,
  and each condition's control sets chosen as the best of ``--draws`` seeded draws by the distance of their cells'
  mean to the pool's mean. Each is scored at the same three sampling seeds per run as the plain sampler.
- ``mixture``: a population made of whole generated sets of the three runs in turn (a set's cells are generated
  jointly, so taking single cells of a set would add the noise the set-mean term removed), against each run alone.
- ``sampler``: ``key=value`` changes of the sample settings (and ``set_size``, the cells generated jointly).
- ``baselines``: additive, linear, train_mean and knn fitted on the training conditions, predicting each validation
  condition at the size of its group.
- ``anchors``: no run is read. The shift MSE on the validation conditions that ``model.anchor = "auto"`` chooses
  by, for each route and for the equal blends of two or all three, with each route's mean cosine to the measured
  shifts.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, _keys, prepare, score  # noqa: E402
from validation_table import fmt  # noqa: E402

COLUMNS = ("pearson_delta", "r2", "pr_auc", "roc_auc", "overlap_at_N", "discrimination_score_l1",
           "discrimination_score_l2", "discrimination_score_cosine", "de_nsig_counts_pred")
SAMPLING_SEEDS = 3


def scored(pred, prep, split) -> list[float]:
    table, _ = score({"p": pred}, prep, split, subset="val")
    return [float(table.loc["p"].get(k, np.nan)) for k in COLUMNS]


def row(split_name: str, label: str, values: list[list[float]]) -> str:
    cells = [fmt([v[j] for v in values]) for j in range(len(COLUMNS))]
    return f"| {split_name} | {label} | {len(values)} | " + " | ".join(cells) + " |"


@contextmanager
def matched_noise():
    """The flow's source noise standardised per gene over each set's cells (zero mean, unit sd)."""
    import perturbdiff.diffusion._flow as flow

    plain = flow.draw

    def draw(kind, shape, generator, device, high=0):
        x = plain(kind, shape, generator, device, high)
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True) if kind == "randn" and len(shape) == 3 else x

    flow.draw = draw
    try:
        yield
    finally:
        flow.draw = plain


@contextmanager
def representative_controls(X, draws: int):
    """Each condition's control sets: the best of ``draws`` seeded draws by ‖mean of the used cells − pool mean‖."""
    import perturbdiff.model._perturbdiff as mp
    from perturbdiff.data._sets import draw_positions
    from perturbdiff.model._generate import SetPlan

    plain = mp.plan_sets

    def plan_sets(n_cells, set_size, n_samples, seed, pools=None):
        S, rows, cond, sample = set_size, [], [], []
        for k in range(n_samples):
            for i, n in enumerate(n_cells):
                n_sets = -(-n // S)
                if n_sets == 0:
                    continue
                pool = pools[i]
                mu = np.asarray(X[pool].mean(0)).ravel()
                best = None
                for j in range(draws):  # j = 0 is the plain sampler's draw
                    pos, _ = draw_positions(np.random.default_rng([seed, k, i] + ([j] if j else [])), len(pool),
                                            n_sets, S)
                    d = float(((np.asarray(X[pool[pos.ravel()[:n]]].mean(0)).ravel() - mu) ** 2).sum())
                    if best is None or d < best[0]:
                        best = (d, pos)
                rows.append(pool[best[1]])
                cond += [i] * n_sets
                sample += [k] * n_sets
        return SetPlan(np.asarray(cond, np.int64), np.asarray(sample, np.int64), np.concatenate(rows), S)

    mp.plan_sets = plan_sets
    try:
        yield
    finally:
        mp.plan_sets = plain


def whole_set_mixture(preds, split, set_size: int):
    """Whole generated sets of each prediction in turn (set s of a condition from prediction s mod k)."""
    import anndata as ad

    obs = preds[0].obs
    key = obs[split.pert_col].astype(str) + "|" + obs[list(split.context_cols)].astype(str).agg("|".join, axis=1)
    position = key.groupby(key).cumcount().to_numpy()
    control = (obs[split.pert_col].astype(str) == split.control).to_numpy()
    for p in preds[1:]:
        if not (p.obs.index == obs.index).all():
            raise SystemExit("the predictions do not list the same cells in the same order")
    take = [np.flatnonzero(((position // set_size) % len(preds) == j) & ~control) for j in range(len(preds))]
    return ad.concat([preds[0][control]] + [p[t] for p, t in zip(preds, take)])


def anchors(prep, keys, split, split_name: str) -> None:
    """Shift MSE on the validation conditions (auto's criterion) of each route and of equal blends of routes."""
    from itertools import combinations

    from perturbdiff._config_rules import AUTO_ANCHORS
    from perturbdiff.data import condition_shifts
    from perturbdiff.model._anchor import Anchor

    fitted = Anchor.fit("knn", prep, keys, split.train)
    measured = condition_shifts(prep, keys, split.val)
    real, val = np.stack(list(measured.values())), list(measured)  # (V, G)
    shifts = {r: replace(fitted, route=r, _baseline=None).shift(val) for r in AUTO_ANCHORS}
    print("| split | anchor | shift MSE on validation | mean cosine to the measured shift |")
    print("|---|---|---|---|")
    for k in (1, 2, 3):
        for group in combinations(shifts, k):
            blend = sum(shifts[r] for r in group) / k
            cos = np.mean([x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12) for x, y in zip(blend, real)])
            print(f"| {split_name} | {' + '.join(group)}{f' (÷ {k})' if k > 1 else ''} | "
                  f"{np.mean((blend - real) ** 2):.5f} | {cos:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work")
    p.add_argument("--split", required=True)
    p.add_argument("--tag", default="e-def1-5k", help="the runs seed0..2 under work/split/tag")
    p.add_argument("--probe", required=True, choices=("spread", "noise", "controls", "mixture", "sampler",
                                                      "baselines", "anchors"))
    p.add_argument("--variants", default="", help="sampler: ';'-separated 'key=value,...' sample settings")
    p.add_argument("--draws", type=int, default=32, help="controls: draws to choose each condition's sets among")
    p.add_argument("--shared", default=str(SHARED))
    args = p.parse_args()
    from perturbdiff import PerturbDiff

    prep, split, keys = prepare(args.split, Path(args.work), Path(args.shared))
    if args.probe == "anchors":
        anchors(prep, keys, split, args.split)
        return
    print("| split | variant | n | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    if args.probe == "baselines":
        from perturbdiff.baselines import make_baseline

        for name in ("additive", "linear", "train_mean", "knn"):
            pred = make_baseline(name, unseen="zero").fit(prep, split, _keys(split)).predict(split.val, None, 0)
            print(row(args.split, name, [scored(pred, prep, split)]), flush=True)
        return
    runs = [PerturbDiff.load(Path(args.work) / args.split / args.tag / f"seed{i}" / "run", adata=prep, which="best")
            for i in range(3)]

    def predict(i: int, seed: int):
        return runs[i].predict(subset="val", seed=seed, progress=False, unknown_perturbations="generic")

    if args.probe == "mixture":
        preds = [predict(i, i) for i in range(3)]
        print(row(args.split, "each run alone", [scored(q, prep, split) for q in preds]))
        mix = whole_set_mixture(preds, split, runs[0].cfg.data.set_size)
        print(row(args.split, "the three runs' sets pooled", [scored(mix, prep, split)]))
        return
    if args.probe == "sampler":
        variants = [""] + [v for v in args.variants.split(";") if v.strip()]
        for v in variants:
            change = {k: int(x) if x.isdigit() else x for k, x in (kv.split("=") for kv in v.split(",") if kv)}
            size = change.pop("set_size", None)
            values = []
            for i, model in enumerate(runs):
                own, own_size = model.cfg.sample, model.cfg.data.set_size
                model.cfg.sample = replace(own, **change)
                model.cfg.data.set_size = size or own_size
                values.append(scored(predict(i, i), prep, split))
                model.cfg.sample, model.cfg.data.set_size = own, own_size
            print(row(args.split, v or "the run's own", values), flush=True)
        return
    X = prep.X.tocsr() if hasattr(prep.X, "tocsr") else prep.X
    alternatives = {"spread": [], "noise": [("moment-matched noise", matched_noise)],
                    "controls": [(f"best of {args.draws} control draws",
                                  lambda: representative_controls(X, args.draws))]}[args.probe]
    for label, patch in [("plain sampler", None), *alternatives]:
        grid = []  # [run][sampling seed] -> scores
        for i in range(3):
            with patch() if patch else contextmanager(lambda: (yield))():
                grid.append([scored(predict(i, i + 1000 * s), prep, split) for s in range(SAMPLING_SEEDS)])
        flat = [v for per_run in grid for v in per_run]
        print(row(args.split, f"{label}, 3 runs × {SAMPLING_SEEDS} sampling seeds", flat), flush=True)
        A = np.asarray(grid, dtype=float)  # (run, sampling seed, score)
        within = np.sqrt(np.nanmean(np.nanvar(A, axis=1, ddof=1), axis=0))
        between = np.nanstd(np.nanmean(A, axis=1), axis=0, ddof=1)
        print(f"| {args.split} | {label}: sd within a run / between runs | | "
              + " | ".join(f"{w:.3f} / {b:.3f}" for w, b in zip(within, between)) + " |", flush=True)


if __name__ == "__main__":
    main()
