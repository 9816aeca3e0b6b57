"""Prediction-powered debiasing: the estimator against ppi-python's numbers, the coverage of its intervals and the
error rate of its DE calls on planted data (many repeats), and ``PerturbDiff.debias`` end to end."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from tests.test_apply import TARGET_SUM, UP, planted_counts, tiny

from perturbdiff import DataError, PerturbDiff
from perturbdiff.data import DataKeys, Split, preprocess
from perturbdiff.evaluate._debias import debias_responses, ppi_mean, tune_lambda

# a fixed case and ppi-python 0.2.3's answers (ppi_mean_pointestimate / ppi_mean_ci, alpha 0.1), computed once
Y = np.array([[1.001, 1.149, 0.863], [0.555, 0.773, 0.504], [1.03, 1.67, 0.754], [0.69, 1.245, 1.178],
              [1.053, 0.535, 0.985], [1.348, 0.328, 0.771]])
YHAT = np.array([[0.32, 0.546, 0.236], [0.341, 0.288, 0.407], [0.752, 1.132, 0.024], [0.375, 0.862, 0.847],
                 [0.431, 0.279, 0.494], [0.782, 0.442, 0.378]])
YHAT_U = np.array([[0.687, 1.054, 0.467], [0.655, 0.744, 0.726], [0.21, 0.73, 1.244], [0.081, 1.044, 0.748],
                   [0.443, 1.5, 1.005], [0.22, 0.73, 0.931], [0.624, 0.973, 0.673], [0.967, 1.275, 0.43],
                   [0.781, 0.515, 0.751]])
LIBRARY = {  # lam: (estimate, lower, upper)
    None: ([0.953282021531304, 1.088525061824156, 0.9876275983201709],
           [0.7986207757192219, 0.8426270710481206, 0.8640773994106876],
           [1.1079432673433862, 1.3344230526001915, 1.1111777972296542]),
    1.0: ([0.9646666666666666, 1.3101666666666667, 1.2198333333333333],
          [0.7678972228290397, 1.084320137770682, 1.0285831343740983],
          [1.1614361105042934, 1.5360131955626515, 1.4110835322925683]),
    0.0: ([0.9461666666666667, 0.9500000000000001, 0.8424999999999999],
          [0.7724480860852851, 0.6452869501950995, 0.7024958078341229],
          [1.1198852472480483, 1.2547130498049006, 0.9825041921658769]),
    0.5: ([0.9554166666666666, 1.1300833333333333, 1.0311666666666668],
          [0.7993118425379588, 0.8961575037328613, 0.9022784090909896],
          [1.1115214907953743, 1.3640091629338054, 1.1600549242423441]),
}


@pytest.mark.parametrize("lam", [None, 1.0, 0.0, 0.5])
def test_ppi_mean_equals_the_library_on_a_fixed_case(lam):
    res = ppi_mean(Y, YHAT, YHAT_U, lam=lam, alpha=0.1)
    est, lo, hi = LIBRARY[lam]
    np.testing.assert_allclose(res.estimate, est, rtol=1e-12)
    np.testing.assert_allclose(res.lower, lo, rtol=1e-12)
    np.testing.assert_allclose(res.upper, hi, rtol=1e-12)


def planted(rng, K: int, G: int, scale: float):
    """Real responses, and generated ones that are ``scale`` × real + a gene bias shared by every condition + an
    error of their own: the target (last row) is exchangeable with the K related conditions."""
    mu = rng.normal(0.0, 1.0, (K + 1, G))
    gen = scale * mu + rng.normal(0.3, 0.2, G) + rng.normal(0.0, 0.3, (K + 1, G))
    real = mu + rng.normal(0.0, 0.1, (K + 1, G))
    return real, gen


@pytest.mark.parametrize("scale,lam", [(0.6, 1.0), (1.5, None), (0.2, None)])
def test_intervals_cover_the_measured_response_at_the_nominal_rate(scale, lam):
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(150):  # 150 repeats x 400 genes
        real, gen = planted(rng, K=4, G=400, scale=scale)
        d = debias_responses(real[:4], gen[:4], gen[4:], lam=lam, level=0.9)
        hits.append(((real[4] >= d.lower[0]) & (real[4] <= d.upper[0])).mean())
    assert 0.88 <= np.mean(hits) <= 0.92


def test_tuned_lambda_is_the_calibration_slope_and_narrows_the_interval():
    rng = np.random.default_rng(1)
    real, gen = planted(rng, K=6, G=2000, scale=1.5)  # the model over-states responses 1.5x
    lam = tune_lambda(real[:6], gen[:6])
    assert lam == pytest.approx(1.5 / (1.5**2 + 0.3**2), abs=0.05)
    tuned, fixed = (debias_responses(real[:6], gen[:6], gen[6:], lam=v) for v in (None, 1.0))
    assert np.mean(tuned.upper - tuned.lower) < 0.6 * np.mean(fixed.upper - fixed.lower)
    real, gen = planted(rng, K=6, G=2000, scale=0.0)  # no signal in the generated responses: lambda -> 0
    assert tune_lambda(real[:6], gen[:6]) < 0.05


def test_de_calls_keep_the_false_discovery_rate():
    rng = np.random.default_rng(2)
    fdp, power = [], []
    G, K = 1000, 5
    for _ in range(100):
        mu = np.zeros((K + 1, G))
        de = rng.random(G) < 0.1
        mu[:, de] = rng.choice([-2.5, 2.5], de.sum())  # the same genes respond in every condition
        gen = 0.8 * mu + rng.normal(0.0, 0.3, (K + 1, G))
        real = mu + rng.normal(0.0, 0.1, (K + 1, G))
        called = debias_responses(real[:K], gen[:K], gen[K:], lam=1.0).called(0.05)[0]
        fdp.append((called & ~de).sum() / max(called.sum(), 1))
        power.append((called & de).sum() / de.sum())
    assert np.mean(fdp) <= 0.05
    assert np.mean(power) > 0.5  # and it finds something


def test_bad_shapes_and_too_few_related_are_named():
    with pytest.raises(DataError, match="at least 2"):
        debias_responses(np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((2, 3)))
    with pytest.raises(DataError, match="responses"):
        debias_responses(np.zeros((3, 3)), np.zeros((3, 4)), np.zeros((2, 3)))
    with pytest.raises(DataError, match="level"):
        debias_responses(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((2, 3)), level=1.5)


# -- the model path ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trained on contexts A, B; UP / DOWN measured but held out in C and D (validation), E is the target."""
    parts = [planted_counts({(c, p): 40 for c in "ABC" for p in ("control", "UP", "DOWN")})]
    for seed, ctx, perts in ((3, "D", ("control", "UP")), (4, "E", ("control", "UP", "DOWN"))):
        extra = planted_counts({("A", p): 40 for p in perts}, seed=seed)  # like A, a context of its own
        extra.obs["cell_type"] = ctx
        extra.obs_names = [f"{ctx}_{n}" for n in extra.obs_names]
        parts.append(extra)
    counts = ad.concat(parts)
    keys = DataKeys("perturbation", "control", ("cell_type",), "counts")
    prep = preprocess(counts, keys, var_names=counts.var_names, target_sum=TARGET_SUM)
    train = [((c,), p) for c in "AB" for p in ("UP", "DOWN")]
    val = [(("C",), "UP"), (("C",), "DOWN"), (("D",), "UP")]
    split = Split(name="planted", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=train, val=val, test=[(("E",), "UP"), (("E",), "DOWN")])
    model = PerturbDiff.from_config(tiny(200), prep, split).train(progress=False)
    run = tmp_path_factory.mktemp("run")
    model.save(run)
    return model, prep, str(run)


def test_debias_end_to_end(trained):
    model, prep, _ = trained
    pred = model.predict(steps=5, start="full", progress=False)
    bulk = model.debias(pred, progress=False)
    assert bulk.shape == (2, prep.n_vars) and list(bulk.obs["perturbation"]) == ["UP", "DOWN"]
    assert bulk.uns["debias"]["n_related"] == 3 and 0.0 <= bulk.uns["debias"]["lam"] <= 1.0
    X, lo, hi = bulk.X, bulk.layers["lower"], bulk.layers["upper"]
    assert np.all(lo <= X + 1e-6) and np.all(X <= hi + 1e-6)
    # the planted UP genes rise in E/UP: the debiased response there is positive and larger than elsewhere
    delta = X - bulk.layers["control"]
    assert delta[0, UP].mean() > 0.5 and delta[0, UP].mean() > delta[0, 16:].mean() + 0.5
    assert np.all(bulk.layers["de"][:, 16:].sum(1) <= 2)  # genes no perturbation moves are (nearly) never called
    assert list(bulk.obs["n_de"]) == list(bulk.layers["de"].sum(1))


def test_debias_refuses_in_sample_too_few_and_overlapping_related(trained):
    model, prep, _ = trained
    pred = model.predict(steps=5, start="full", progress=False)
    with pytest.raises(DataError, match="trained on: their error is in-sample"):
        model.debias(pred, related=[(("A",), "UP"), (("C",), "UP")])
    with pytest.raises(DataError, match="at least 2"):
        model.debias(pred, related=[(("C",), "UP")])
    with pytest.raises(DataError, match="also predicted targets"):
        model.debias(pred, related=[(("E",), "UP"), (("C",), "UP")])
    with pytest.raises(DataError, match="no measured cells"):
        model.debias(pred, related=[(("D",), "DOWN"), (("C",), "UP")])


def test_cli_predict_debias_writes_both_files_and_refuses_before_work(trained, tmp_path, capsys):
    import anndata as ad

    from perturbdiff.cli import main

    model, prep, run = trained
    prep.write_h5ad(tmp_path / "prep.h5ad")
    args = ["predict", run, "--data", str(tmp_path / "prep.h5ad"), "--steps", "5", "--start", "full",
            "--no-progress", "--debias"]
    assert main([*args, "--out", str(tmp_path / "pred.h5ad")]) == 0
    assert "debiased conditions" in capsys.readouterr().out
    bulk = ad.read_h5ad(tmp_path / "pred.debiased.h5ad")
    assert bulk.n_obs == 2 and bulk.uns["debias"]["level"] == 0.9 and set(bulk.layers) >= {"lower", "qvalue", "de"}
    assert ad.read_h5ad(tmp_path / "pred.h5ad").obs["predicted"].any()
    # the report shows the intervals against the real responses, and their coverage
    model.split.write(tmp_path / "split.json")
    assert main(["evaluate", str(tmp_path / "pred.h5ad"), "--data", str(tmp_path / "prep.h5ad"), "--split",
                 str(tmp_path / "split.json"), "--baselines", "additive", "--debiased",
                 str(tmp_path / "pred.debiased.h5ad"), "--out", str(tmp_path / "eval")]) == 0
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Debiased responses and their 90 % intervals" in page and "% of genes (2 conditions)" in page
    assert (tmp_path / "eval" / "figures" / "debiased.png").exists()
    # one validation condition: refused in one line, before anything is generated or written
    one_val = Split(name="one", pert_col="perturbation", control="control", context_cols=["cell_type"],
                    train=[((c,), p) for c in "AB" for p in ("UP", "DOWN")], val=[(("C",), "UP")],
                    test=[(("E",), "UP")])
    one_val.write(tmp_path / "one.json")
    assert main([*args, "--split", str(tmp_path / "one.json"), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists() and not (tmp_path / "x.debiased.h5ad").exists()
    assert main(["predict", run, "--controls", str(tmp_path / "prep.h5ad"), "--perturbations", "UP",
                 "--context-keys", "cell_type", "--input-kind", "log1p", "--debias",
                 "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "--debias cannot be used with --controls" in capsys.readouterr().err


# -- the report's verdict -----------------------------------------------------------------------------------------
def test_verdict_classifies_a_planted_win_tie_and_loss():
    import pandas as pd

    from perturbdiff.evaluate import verdict, verdict_lines, verdict_table

    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.7, 12)
    noise = rng.normal(0.0, 0.01, 12)
    assert verdict(base + 0.05 + noise, base, lower_better=False) == "win"
    assert verdict(base + noise, base, lower_better=False) == "tie"
    assert verdict(base - 0.05 + noise, base, lower_better=False) == "loss"
    assert verdict(base - 0.05 + noise, base, lower_better=True) == "win"  # an error that went down
    assert verdict([0.361], [0.360], lower_better=False) == "tie"  # one condition: within 2 % is a tie
    assert verdict([0.40], [0.30], lower_better=False) == "win"
    assert verdict([np.nan], [0.3], lower_better=False) == "—"
    keys = pd.DataFrame({"context": ["c"] * 12, "perturbation": [f"p{i}" for i in range(12)]})
    per = {"model": keys.assign(pearson_delta=base + 0.05 + noise, mse=base + 0.05 + noise, r2=base + noise,
                                de_nsig_counts_pred=5.0),
           "linear": keys.assign(pearson_delta=base, mse=base, r2=base, de_nsig_counts_pred=3.0)}
    table = verdict_table(per, "model", ["linear"], ["pearson_delta", "mse", "r2", "de_nsig_counts_pred"])
    assert table["linear"].to_dict() == {"pearson_delta": "win", "mse": "loss", "r2": "tie"}  # counts left out
    assert verdict_lines(table, "model") == ["model against linear: 1 won, 1 tied, 1 lost (lost: mse)"]
