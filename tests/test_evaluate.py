"""Evaluation: the real/pred layout and its errors, R², cell-eval against itself, the report, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import DataError
from perturbdiff.data import Split
from perturbdiff.evaluate import (
    METRICS,
    build_real,
    evaluate,
    format_table,
    make_pair,
    metric,
    pseudobulk_r2,
    write_report,
)
from perturbdiff.evaluate._layout import select_sample
from perturbdiff.evaluate._registry import headline, is_score, label, lower_is_better, scatter_metrics

PERT, CTX, CTRL = "perturbation", "cell_type", "control"


def toy(seed: int = 0, n: int = 40, g: int = 30, dense: bool = False) -> AnnData:
    """log1p data: 2 contexts x (control, A, B, C); A raises genes 0-3, B lowers genes 4-7 (clean DE)."""
    rng = np.random.default_rng(seed)
    rows, blocks = [], []
    for ctx, scale in (("c1", 2.0), ("c2", 3.0)):
        for pert in (CTRL, "A", "B", "C"):
            lam = np.full(g, scale)
            if pert == "A":
                lam[:4] *= 6
            if pert == "B":
                lam[4:8] /= 6
            blocks.append(np.log1p(rng.poisson(lam, (n, g)).astype(np.float32)))
            rows += [(ctx, pert)] * n
    obs = pd.DataFrame(rows, columns=[CTX, PERT])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    X = np.vstack(blocks)
    return AnnData(X=X if dense else sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))


SPLIT = Split(
    "toy", PERT, CTRL, [CTX], train=[(("c1",), "C"), (("c2",), "C")], val=[],
    test=[(("c1",), "A"), (("c1",), "B"), (("c2",), "A"), (("c2",), "B")],
)  # fmt: skip


def perturbed(real: AnnData) -> AnnData:
    return real[(real.obs[PERT] != CTRL).to_numpy()].copy()


def test_build_real_holds_test_cells_and_their_controls():
    data = toy()
    split = Split("s", PERT, CTRL, [CTX], train=[], val=[], test=[(("c1",), "A")], var_names=["g3", "g1"])
    real = build_real(data, split)
    assert sorted(map(tuple, real.obs[[CTX, PERT]].drop_duplicates().to_numpy())) == [("c1", "A"), ("c1", CTRL)]
    assert real.n_obs == 80 and list(real.var_names) == ["g3", "g1"]
    np.testing.assert_array_equal(real.X.toarray()[:, 0], data[real.obs_names, "g3"].X.toarray()[:, 0])
    bad = Split("s", PERT, CTRL, [CTX], train=[], val=[], test=[(("c1",), "A")], var_names=["g1", "nope"])
    with pytest.raises(DataError, match="nope"):
        build_real(data, bad)


def test_pair_adds_real_controls_and_reorders_genes():
    real = build_real(toy(), SPLIT)
    pred = perturbed(real)[:, ::-1].copy()  # genes reversed
    full, real2 = make_pair(pred, real, pert_col=PERT, control=CTRL, context_col=CTX)
    assert list(full.var_names) == list(real.var_names)
    assert (full.obs[PERT] == CTRL).sum() == (real.obs[PERT] == CTRL).sum() == 80
    ctrl = (full.obs[PERT] == CTRL).to_numpy()
    np.testing.assert_array_equal(full.X[ctrl].toarray(), real2.X[(real2.obs[PERT] == CTRL).to_numpy()].toarray())


def test_pair_errors_name_what_is_wrong():
    real = build_real(toy(), SPLIT)
    pred = perturbed(real)
    renamed = pred.copy()
    renamed.var_names = ["g0", "ghost", *renamed.var_names[2:]]
    with pytest.raises(DataError, match="'g1'|'ghost'"):
        make_pair(renamed, real, pert_col=PERT, control=CTRL, context_col=CTX)
    no_ctrl = real[~((real.obs[CTX] == "c2") & (real.obs[PERT] == CTRL)).to_numpy()].copy()
    with pytest.raises(DataError, match="c2"):
        make_pair(pred, no_ctrl, pert_col=PERT, control=CTRL, context_col=CTX)
    missing_b = pred[~((pred.obs[CTX] == "c1") & (pred.obs[PERT] == "B")).to_numpy()].copy()
    with pytest.raises(DataError, match="pred has no cells of perturbation='B' in cell_type='c1'"):
        make_pair(missing_b, real, pert_col=PERT, control=CTRL, context_col=CTX)
    extra = pred.copy()
    extra.obs[PERT] = extra.obs[PERT].astype(str).replace({"A": "Z"})
    with pytest.raises(DataError, match="'Z'"):
        make_pair(extra, real, pert_col=PERT, control=CTRL, context_col=CTX)
    with pytest.raises(DataError, match="'donor'"):
        make_pair(pred, real, pert_col=PERT, control=CTRL, context_col="donor")
    big = pred.copy()
    big.X = big.X * 20.0
    with pytest.raises(DataError, match="below 15"):
        make_pair(big, real, pert_col=PERT, control=CTRL, context_col=CTX)


def test_r2_matches_sklearn_per_condition():
    from sklearn.metrics import r2_score

    real = build_real(toy(), SPLIT)
    pred = perturbed(build_real(toy(seed=1), SPLIT))
    full, real2 = make_pair(pred, real, pert_col=PERT, control=CTRL, context_col=CTX)
    r2 = pseudobulk_r2(full, real2, pert_col=PERT, control=CTRL, context_col=CTX).set_index(["context", "perturbation"])
    assert len(r2) == 4

    def pb(a: AnnData, pert: str = "B") -> np.ndarray:
        m = ((a.obs[CTX] == "c2") & (a.obs[PERT] == pert)).to_numpy()
        return np.asarray(a.X[m].mean(axis=0)).ravel()

    assert r2.loc[("c2", "B"), "r2"] == pytest.approx(r2_score(pb(real2), pb(full)))
    assert 0.5 < r2.loc[("c2", "B"), "r2"] < 1.0
    ctrl = pb(real2, CTRL)
    assert r2.loc[("c2", "B"), "r2_delta"] == pytest.approx(r2_score(pb(real2) - ctrl, pb(full) - ctrl))
    assert r2.loc[("c2", "B"), "r2_delta"] < r2.loc[("c2", "B"), "r2"]  # the basal profile no longer counts


def test_select_sample_keeps_first():
    pred = perturbed(build_real(toy(), SPLIT))
    a, b = pred.copy(), pred.copy()
    a.obs["sample"], b.obs["sample"] = "0", "1"
    b.obs_names = [f"x{i}" for i in range(b.n_obs)]
    both = AnnData(X=sp.vstack([a.X, b.X * 0.5]).tocsr(), obs=pd.concat([a.obs, b.obs]), var=a.var)
    chosen = select_sample(both)
    assert chosen.n_obs == pred.n_obs and set(chosen.obs["sample"]) == {"0"}


def test_evaluate_real_against_itself_is_perfect(tmp_path):
    """One cell-eval run on dense X (numba compiles pdex's tests on first use: ~5 s dense, ~15 s sparse)."""
    import torch
    from cell_eval import metrics_registry
    from cell_eval._types import MetricBestValue

    real = build_real(toy(dense=True), SPLIT)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per, agg = evaluate(perturbed(real), real, pert_col=PERT, control=CTRL, context_col=CTX, outdir=tmp_path,
                            num_threads=2)
        assert torch.get_num_threads() == 1  # the DE tests' 2 threads do not carry into the next training
    finally:
        torch.set_num_threads(before)
    assert len(per) == 4 and {"overlap_at_N", "pr_auc", "pearson_delta", "r2"} <= set(per.columns)
    checked = 0
    for name in per.columns:
        if name in ("context", "perturbation") or name not in metrics_registry.list_metrics():
            continue
        best = metrics_registry.get_metric(name).best_value
        values = pd.to_numeric(per[name], errors="coerce").dropna()
        if best is MetricBestValue.NONE or values.empty:
            continue
        target = 1.0 if best is MetricBestValue.ONE else 0.0
        np.testing.assert_allclose(values, target, atol=1e-6, err_msg=name)
        checked += 1
    assert checked >= 15
    assert agg["r2"] == pytest.approx(1.0) and agg["pearson_delta"] == pytest.approx(1.0)
    assert agg["overlap_at_N"] == pytest.approx(1.0) and agg["mse"] == pytest.approx(0.0)
    assert (tmp_path / "per_condition.csv").exists() and (tmp_path / "aggregate.csv").exists()


def test_report_is_one_self_contained_page(tmp_path):
    real = build_real(toy(), SPLIT)
    model = perturbed(real)
    model.obs["sample"] = "0"
    second = model.copy()
    second.obs["sample"], second.obs_names = "1", [f"s{i}" for i in range(second.n_obs)]
    model = AnnData(X=sp.vstack([model.X, second.X * 0.9]).tocsr(), obs=pd.concat([model.obs, second.obs]),
                    var=model.var)  # fmt: skip
    base = perturbed(build_real(toy(seed=2), SPLIT))
    keys = pd.DataFrame({"context": ["c1", "c1", "c2", "c2"], "perturbation": ["A", "B", "A", "B"]})
    per = {"model": keys.assign(pearson_delta=[0.9, 0.8, 0.7, 0.6], pr_auc=np.nan, r2=0.9),
           "additive": keys.assign(pearson_delta=[0.5, 0.6, 0.7, 0.8], pr_auc=np.nan, r2=0.8)}  # fmt: skip
    table = pd.DataFrame({n: df[["pearson_delta", "pr_auc", "r2"]].mean() for n, df in per.items()}).T
    path = write_report(table, tmp_path, per_condition=per, preds={"model": model, "additive": base}, real=real,
                        pert_col=PERT, control=CTRL, context_col=CTX, baselines=["additive"])  # fmt: skip
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 5  # bars, scatter, lfc, pca, sample spread
    assert "—" in page and "<img src='http" not in page
    # the verdict, in words: pearson_delta ties (per-condition differences of +0.4 ... -0.2 straddle 0), r2 wins
    assert "model against additive: 1 won, 1 tied, 0 lost" in page
    assert "<h2>Glossary</h2>" in page and "Pearson r of predicted vs real mean shift" in page
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        f"{k}.png" for k in ("metrics", "scatter", "lfc", "pca", "spread")
    }


@pytest.mark.slow
def test_cli_baseline_and_evaluate(tmp_path, synthetic_prep, synthetic_keys, capsys):
    """``perturbdiff baseline`` then ``perturbdiff evaluate`` with all baselines on the shared synthetic data."""
    from perturbdiff.cli import main
    from perturbdiff.data import make_split

    split = make_split(synthetic_prep, synthetic_keys, "held-out-contexts-partial", seed=0)
    split.write(tmp_path / "split.json")
    data = tmp_path / "data.h5ad"
    synthetic_prep.write_h5ad(data)
    pred = tmp_path / "add.h5ad"
    assert main(["baseline", "additive", str(data), "--split", str(tmp_path / "split.json"), "--out", str(pred)]) == 0
    out = tmp_path / "eval"
    argv = ["evaluate", str(pred), "--data", str(data), "--split", str(tmp_path / "split.json"),
            "--names", "mine", "--baselines", "control,additive", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = pd.read_csv(out / "aggregate.csv", index_col=0)
    assert list(table.index) == ["mine", "control", "additive"]
    # "mine" is the additive baseline with the same seed: identical cells, identical scores
    np.testing.assert_allclose(table.loc["mine", "pearson_delta"], table.loc["additive", "pearson_delta"])
    assert table.loc["additive", "r2"] > table.loc["control", "r2"]
    assert (out / "report.html").exists() and "mine" in capsys.readouterr().out


def test_select_sample_ignores_the_carried_control_cells():
    obs = pd.DataFrame({"sample": [0, 0, 1, 1, -1, -1], "predicted": [True] * 4 + [False] * 2})
    obs.index = obs.index.astype(str)
    pred = AnnData(X=np.zeros((6, 2), np.float32), obs=obs)
    kept = select_sample(pred)
    assert kept.obs["sample"].tolist() == [0, 0, -1, -1]


def test_registry_holds_the_metric_lists_and_agrees_with_cell_eval():
    from cell_eval import metrics_registry
    from cell_eval._types import MetricBestValue

    assert headline() == ["overlap_at_N", "precision_at_N", "de_direction_match", "de_spearman_lfc_sig", "pr_auc",
                          "roc_auc", "pearson_delta", "mse", "mae", "discrimination_score_l1",
                          "discrimination_score_l2", "discrimination_score_cosine", "r2", "r2_delta"]  # fmt: skip
    assert scatter_metrics() == ["pearson_delta", "r2", "pr_auc", "overlap_at_N", "mse", "discrimination_score_l1"]
    assert {m for m in METRICS if lower_is_better(m)} == {"mse", "mae", "mse_delta", "mae_delta", "energy_distance"}
    assert {m for m in METRICS if not is_score(m)} == {"de_nsig_counts_real", "de_nsig_counts_pred"}
    assert is_score("some_new_metric") and not lower_is_better("some_new_metric")
    assert [label(m) for m in ("discrimination_score_l2", "de_spearman_lfc_sig", "pearson_delta", "mse")] == [
        "pds_l2", "lfc_rho", "pearson_Δ", "mse"]  # fmt: skip
    best = {MetricBestValue.ONE: "higher", MetricBestValue.ZERO: "lower", MetricBestValue.NONE: None}
    known = set(metrics_registry.list_metrics())
    for m in METRICS.values():
        name = m.name.removesuffix("_real").removesuffix("_pred")
        assert m.cell_eval == (name in known), m.name
        if m.cell_eval:
            assert best[metrics_registry.get_metric(name).best_value] == m.best, m.name
    assert known <= {m.removesuffix("_real") for m in METRICS}  # every cell-eval metric is registered
    table = pd.DataFrame({"pearson_delta": [0.5], "mse": [np.nan]}, index=["model"])
    assert format_table(table).splitlines()[0].split() == ["pearson_Δ", "mse"]
    with pytest.raises(KeyError, match="known: overlap_at_N"):
        metric("nope")


def _validator_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The training validator's formula before the registry (_model._pearson at 35b3620), kept as the reference."""
    import math

    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def test_pearson_delta_is_the_validators_formula():
    """Same floats as the validator's former private formula, float32 and float64 inputs alike."""
    compute = metric("pearson_delta").compute
    rng = np.random.default_rng(0)
    pred, real, ctrl = rng.normal(size=(3, 40)), rng.normal(size=(3, 40)).astype(np.float32), rng.normal(size=40)
    assert compute(pred[0], real[0], ctrl) == pytest.approx(np.corrcoef(pred[0] - ctrl, real[0] - ctrl)[0, 1])
    assert np.isnan(compute(ctrl, real[0], ctrl))  # no predicted shift: r undefined
    for p, r in zip(pred, real):
        for c in (ctrl, ctrl.astype(np.float32)):
            assert compute(p, r, c) == _validator_pearson(p - c, r - c)
            assert compute(p.astype(np.float32), r, c) == _validator_pearson(p.astype(np.float32) - c, r - c)


def test_data_ceiling_bounds_scores_and_leaves_errors_undefined(tmp_path):
    from perturbdiff.evaluate import CEILING, data_ceiling, with_ceiling

    real = build_real(toy(), SPLIT)
    ceiling = data_ceiling(real, pert_col=PERT, control=CTRL, context_col=CTX)
    assert ceiling.name == CEILING
    assert 0.5 < ceiling["pearson_delta"] <= 1.0 and 0.5 < ceiling["pr_auc"] <= 1.0
    assert np.isnan(ceiling.get("mse", np.nan))  # no defensible ceiling for an error
    table = with_ceiling(pd.DataFrame({"pearson_delta": [0.4], "mse": [0.1]}, index=["model"]), real,
                         pert_col=PERT, control=CTRL, context_col=CTX)
    assert list(table.index) == ["model", CEILING] and np.isnan(table.loc[CEILING, "mse"])
    page = write_report(table, tmp_path, model="model").read_text()
    assert "<b>" not in page.split("<h2>Summary</h2>")[1].split("</table>")[0]  # a ceiling is no contender to beat


def test_experiment_card_says_what_was_compared():
    import json

    from perturbdiff.evaluate._page import experiment_card

    real = build_real(toy(), SPLIT)
    pred = perturbed(real)
    pred.uns["perturbdiff"] = {"run": json.dumps({"process": "flow", "hidden": 64, "depth": 2, "set_size": 32,
                                                  "parameters": 1234, "max_steps": 1500, "step": 1200}),
                               "settings": json.dumps({"steps": 25, "guidance": 0.0})}
    keys = pd.DataFrame({"context": ["c1", "c2"], "perturbation": ["A", "A"]})
    results = pd.DataFrame({"de_nsig_counts_real": [7.0, 7.0], "de_nsig_counts_pred": [18.0, 448.0]},
                           index=["model", "mean"])
    card = dict(experiment_card(results, {"model": keys}, "model", {"model": pred}, real, pert_col=PERT,
                                control=CTRL, context_col=CTX, baselines=["mean"]))
    assert "a budget of 1500 training steps; the checkpoint used is from step 1200" in card["model"]
    assert "1,234 parameters" in card["model"] and card["sampling"] == "steps 25, guidance 0.0"
    assert "latent" not in card["model"]  # a run without a latent codec (or from before codecs were recorded)
    assert card["held-out conditions"] == "2 in 2 context(s): c1, c2"
    assert card["DE genes per condition (FDR < 0.05)"] == "real 7; model 18; mean 448"
    assert "``" not in card["baseline mean"] and "pert_mean" in card["baseline mean"]
    run = json.loads(pred.uns["perturbdiff"]["run"]) | {"codec": "latent", "latent_dim": 128}
    pred.uns["perturbdiff"]["run"] = json.dumps(run)
    card = dict(experiment_card(results, {"model": keys}, "model", {"model": pred}, real, pert_col=PERT,
                                control=CTRL, context_col=CTX, baselines=["mean"]))
    assert card["model"].startswith("model: flow process over a 128-dimensional latent, hidden 64")


def test_the_scorer_context_gives_torch_its_thread_count_back():
    import torch

    from perturbdiff.evaluate._metrics import quiet_scorer

    before = torch.get_num_threads()
    with pytest.raises(ValueError), quiet_scorer():
        torch.set_num_threads(before + 1)  # as pdex's numba.set_num_threads does through the shared OpenMP pool
        raise ValueError("a scorer failing after changing the count")
    assert torch.get_num_threads() == before
