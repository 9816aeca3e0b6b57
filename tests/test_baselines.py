"""Baselines recover planted group means on tiny synthetic data; unknown perturbations raise clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import ConfigError, DataError
from perturbdiff.baselines import BASELINES, AdditiveBaseline, ControlBaseline, LinearBaseline, MeanBaseline
from perturbdiff.data import DataKeys, Split

G = 6
BASE = {"c1": np.full(G, 3.0), "c2": np.full(G, 4.0), "c3": np.full(G, 5.0)}
# planted shifts: A differs by context (c1 vs c2), B is the same everywhere
SHIFT = {
    ("c1", "A"): np.array([1.0, 0, 0, 0, 0, -0.5]),
    ("c2", "A"): np.array([2.0, 0, 0, 0, 0, -1.0]),
    ("c1", "B"): np.array([0, 1.5, 0, 0, 0, 0]),
    ("c2", "B"): np.array([0, 1.5, 0, 0, 0, 0]),
    ("c3", "A"): np.array([9.0, 9, 9, 9, 9, 9]),  # present in the data, never in training
}
N = {"control": 4, "A": 4, "B": 6}
KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p", batch_key="batch")


def planted() -> AnnData:
    """Each group's cells = planted mean ± 0.25 (alternating), so group means are exact."""
    rows, blocks = [], []
    for ctx, base in BASE.items():
        for pert in ("control", "A", "B"):
            shift = np.zeros(G) if pert == "control" else SHIFT.get((ctx, pert))
            if shift is None:
                continue
            n = N[pert]
            wiggle = np.where(np.arange(n) % 2 == 0, 0.25, -0.25)[:, None] * np.ones(G)  # (n, G), mean 0
            blocks.append(base + shift + wiggle)
            rows += [(ctx, pert, f"b{i % 2}") for i in range(n)]
    obs = pd.DataFrame(rows, columns=["cell_type", "perturbation", "batch"])
    obs.index = obs.index.astype(str)
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


TRAIN = [(("c1",), "A"), (("c2",), "A"), (("c1",), "B"), (("c2",), "B")]
TEST = [(("c3",), "A")]


def make_split(train=TRAIN, test=TEST) -> Split:
    return Split("toy", "perturbation", "control", ["cell_type"], list(train), [], list(test))


def assert_cells_around(pred: AnnData, mean: np.ndarray, rows: slice = slice(None)) -> None:
    """Shift baselines return sampled control cells + Δ: each cell = planted mean ± 0.25 (the control wiggle)."""
    resid = np.asarray(pred.X)[rows] - mean[None, :]  # (n, G)
    np.testing.assert_allclose(np.abs(resid), 0.25, atol=1e-5)
    np.testing.assert_allclose(resid, resid[:, :1] * np.ones_like(resid), atol=1e-5)  # one control cell each


def test_registry_and_output_layout():
    assert set(BASELINES) == {"control", "mean", "additive", "linear", "train_mean", "knn"}
    data = planted()
    for name, cls in BASELINES.items():
        model = cls().fit(data, make_split(), KEYS)
        pred = model.predict([(("c3",), "A"), ("c1", "B")], [3, 5], seed=1)
        assert pred.n_obs == 8, name
        assert list(pred.var_names) == list(data.var_names)
        assert pred.X.dtype == np.float32 and (np.asarray(pred.X) >= 0).all()
        assert list(pred.obs["perturbation"]) == ["A"] * 3 + ["B"] * 5
        assert list(pred.obs["cell_type"]) == ["c3"] * 3 + ["c1"] * 5


def test_control_baseline_returns_context_control_cells():
    data = planted()
    pred = ControlBaseline().fit(data, make_split(), KEYS).predict(TEST, [50], seed=0)
    assert_cells_around(pred, BASE["c3"])  # sampled with replacement (PEERS protocol): 50 cells from a pool of 4


def test_additive_uses_same_context_else_mean_over_contexts():
    data = planted()
    model = AdditiveBaseline().fit(data, make_split(), KEYS)
    unseen = model.predict(TEST, [20], seed=0)
    expected = BASE["c3"] + (SHIFT[("c1", "A")] + SHIFT[("c2", "A")]) / 2
    assert_cells_around(unseen, expected)  # whole cells: the control cells' spread is kept
    same = model.predict([(("c1",), "A")], [20], seed=0)
    assert_cells_around(same, BASE["c1"] + SHIFT[("c1", "A")])
    combo = model.predict([(("c3",), "A+B")], [20], seed=0)
    assert_cells_around(combo, expected + SHIFT[("c1", "B")])


def test_additive_clips_at_zero():
    data = planted()
    X = data.X.toarray()
    X[((data.obs["cell_type"] == "c1") & (data.obs["perturbation"] == "B")).to_numpy()] = 0.0  # B knocks out all
    data.X = sp.csr_matrix(X)
    pred = AdditiveBaseline().fit(data, make_split(), KEYS).predict([(("c1",), "B")], [40], seed=0)
    # controls 3 ± 0.25 shifted by -3: the -0.25 cells clip to 0, the +0.25 cells stay
    np.testing.assert_allclose(np.unique(np.asarray(pred.X).round(5)), [0.0, 0.25], atol=1e-5)


def test_mean_overall_and_context_variants():
    data = planted()
    overall = MeanBaseline().fit(data, make_split(), KEYS).predict(TEST, [5], seed=0)
    pooled_a = (BASE["c1"] + SHIFT[("c1", "A")] + BASE["c2"] + SHIFT[("c2", "A")]) / 2  # equal cell counts
    X = np.asarray(overall.X)
    np.testing.assert_allclose(X, np.repeat(pooled_a[None], 5, axis=0), atol=1e-6)  # every cell = the mean
    ctx = MeanBaseline("context").fit(data, make_split(), KEYS).predict([(("c2",), "A"), TEST[0]], [2, 2], seed=0)
    np.testing.assert_allclose(np.asarray(ctx.X)[0], BASE["c2"] + SHIFT[("c2", "A")], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ctx.X)[2], pooled_a, atol=1e-6)


def test_mean_unseen_combination_is_context_control_plus_parts():
    data = planted()
    pred = MeanBaseline().fit(data, make_split(), KEYS).predict([(("c3",), "A+B")], [2], seed=0)
    delta = (SHIFT[("c1", "A")] + SHIFT[("c2", "A")]) / 2 + SHIFT[("c1", "B")]
    np.testing.assert_allclose(np.asarray(pred.X)[0], BASE["c3"] + delta, atol=1e-6)


def test_mean_batch_variant_uses_batch_means():
    data = planted()
    model = MeanBaseline("batch").fit(data, make_split(), KEYS)
    pred = model.predict(TEST, [40], seed=0)
    # batch b0 holds the +0.25 cells, b1 the -0.25 cells of every group (A: 2 + 2 per trained context)
    pooled_a = (BASE["c1"] + SHIFT[("c1", "A")] + BASE["c2"] + SHIFT[("c2", "A")]) / 2
    values = np.unique(np.asarray(pred.X)[:, 1].round(5))
    np.testing.assert_allclose(sorted(values), [pooled_a[1] - 0.25, pooled_a[1] + 0.25], atol=1e-5)
    with pytest.raises(ConfigError, match="batch"):
        MeanBaseline("batch").fit(data, make_split(), DataKeys("perturbation", "control", ("cell_type",), "log1p"))


def test_linear_recovers_additive_structure():
    data = planted()
    # train (c1, A), (c1, B), (c2, B): ridge (alpha -> 0) must predict (c2, A) = shift_A(c1) + [b_c2 - b_c1] = ...
    # with B identical in c1 and c2 the context effect is 0, so Δ(c2, A) = Δ(c1, A).
    split = make_split([(("c1",), "A"), (("c1",), "B"), (("c2",), "B")], [(("c2",), "A")])
    model = LinearBaseline(alpha=1e-8).fit(data, split, KEYS)
    np.testing.assert_allclose(model.delta(("c2",), "A"), SHIFT[("c1", "A")], atol=1e-5)
    assert_cells_around(model.predict([(("c2",), "A")], [20], seed=0), BASE["c2"] + SHIFT[("c1", "A")])


def test_unseen_parts():
    data = planted()
    for cls in (AdditiveBaseline, MeanBaseline, LinearBaseline):
        with pytest.raises(DataError, match="'Z', 'Y'"):  # no part seen: a clear error naming them
            cls().fit(data, make_split(), KEYS).predict([(("c3",), "Z+Y")], [2], seed=0)
    model = AdditiveBaseline().fit(data, make_split(), KEYS)
    partly = model.predict([(("c3",), "A+Z")], [20], seed=0)  # Z unseen: no effect, A's shift kept
    assert_cells_around(partly, BASE["c3"] + (SHIFT[("c1", "A")] + SHIFT[("c2", "A")]) / 2)
    zero = AdditiveBaseline(unseen="zero").fit(data, make_split(), KEYS).predict([(("c3",), "Z")], [20], seed=0)
    assert_cells_around(zero, BASE["c3"])  # unseen="zero": predicts no effect
    with pytest.raises(DataError, match="c9"):
        ControlBaseline().fit(data, make_split(), KEYS).predict([(("c9",), "A")], [2], seed=0)
    with pytest.raises(ConfigError, match="unseen"):
        AdditiveBaseline(unseen="ignore")


def test_default_n_cells_and_seed():
    data = planted()
    model = AdditiveBaseline().fit(data, make_split(), KEYS)
    pred = model.predict(TEST, None, seed=3)
    assert pred.n_obs == N["A"]  # as many cells as the real group
    again = model.predict(TEST, None, seed=3)
    np.testing.assert_array_equal(np.asarray(pred.X), np.asarray(again.X))


def test_every_registered_baseline_runs_with_its_defaults_as_evaluate_and_the_demo_call_it():
    from perturbdiff.cli.evaluate import run_baselines

    split = make_split()
    preds = run_baselines(list(BASELINES), planted(), split, KEYS, "test", 0)
    assert set(preds) == set(BASELINES)
    assert all(p.n_obs > 0 for p in preds.values())
