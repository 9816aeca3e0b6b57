"""The simulator: layout, sparsity, planted effects, determinism, speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff import ConfigError
from perturbdiff.datasets import read_h5ad, simulate


def _log1p_norm(adata) -> np.ndarray:
    X = adata.X.toarray()
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)  # (N, G)


def test_layout(synthetic_counts):
    a = synthetic_counts
    assert a.shape == (600, 120)
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    assert np.array_equal(a.X.data, np.rint(a.X.data)) and a.X.data.min() >= 1
    assert list(a.var_names[:2]) == ["G0001", "G0002"]
    for col in ("perturbation", "cell_type", "batch"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
        assert all(isinstance(c, str) for c in a.obs[col].cat.categories)
    assert a.obs["cell_type"].nunique() == 3 and a.obs["batch"].nunique() == 2
    labels = set(a.obs["perturbation"].cat.categories)
    combos = {p for p in labels if "+" in p}
    assert "control" in labels and len(combos) == 2 and len(labels) == 1 + 6 + 2
    for c in combos:
        assert set(c.split("+")) <= labels  # both parts were measured alone


@pytest.mark.parametrize("shape", [(600, 120), (3000, 400)])
def test_sparsity_and_control_share(shape):
    a = simulate(*shape, seed=3)
    zeros = 1 - a.X.nnz / np.prod(a.shape)
    assert 0.70 <= zeros <= 0.95
    share = float((a.obs["perturbation"] == "control").mean())
    assert 0.20 <= share <= 0.30
    lib = np.asarray(a.X.sum(1)).ravel()
    assert lib.std() / lib.mean() > 0.25  # library sizes vary between cells


def test_ground_truth_json(synthetic_counts):
    truth = synthetic_counts.uns["simulation"]
    json.dumps(truth)  # serialisable as it is
    perts, combos = truth["perturbations"], truth["combos"]
    assert set(perts) | set(combos) | {"control"} == set(synthetic_counts.obs["perturbation"].cat.categories)
    effects = {v["effect"] for v in perts.values()}
    assert {"strong", "null"} <= effects
    for v in perts.values():
        assert (len(v["genes"]) == 0) == (v["effect"] == "null")
        assert set(v["log_fc"]) == set(truth["cell_types"])
    assert any(not c["additive"] for c in combos.values())
    assert len(truth["hidden"]["response_scale"]) == 3 * 2  # one per (batch, cell type)


def test_h5ad_roundtrip(synthetic_counts, tmp_path):
    path = tmp_path / "sim.h5ad"
    synthetic_counts.write_h5ad(path)
    back = read_h5ad(path)
    assert (back.X != synthetic_counts.X).nnz == 0
    assert set(back.uns["simulation"]["perturbations"]) == set(synthetic_counts.uns["simulation"]["perturbations"])


def test_strong_effects_visible():
    """Planted strong effects show in mean log1p expression, perturbed vs control of the same cell type."""
    a = simulate(4000, 200, seed=1)
    x, obs, truth = _log1p_norm(a), a.obs, a.uns["simulation"]
    genes = {g: i for i, g in enumerate(a.var_names)}
    strong = [p for p, v in truth["perturbations"].items() if v["effect"] == "strong"]
    agree = []
    for p in strong:
        v = truth["perturbations"][p]
        idx = np.array([genes[g] for g in v["genes"]])
        for ct in truth["cell_types"]:
            lfc = np.array(v["log_fc"][ct])
            ctrl = x[((obs["perturbation"] == "control") & (obs["cell_type"] == ct)).to_numpy()][:, idx].mean(0)
            pert = x[((obs["perturbation"] == p) & (obs["cell_type"] == ct)).to_numpy()][:, idx].mean(0)
            visible = (np.abs(lfc) >= 0.8) & (np.maximum(ctrl, pert) > 0.5)  # big effect on a detected gene
            agree += list(np.sign(pert - ctrl)[visible] == np.sign(lfc[visible]))
    assert len(strong) >= 2 and len(agree) >= 50
    assert np.mean(agree) >= 0.9


def test_null_smaller_than_strong():
    a = simulate(4000, 200, seed=1)
    x, obs, truth = _log1p_norm(a), a.obs, a.uns["simulation"]
    ctrl = x[(obs["perturbation"] == "control").to_numpy()].mean(0)

    def shift(p: str) -> float:
        return float(np.abs(x[(obs["perturbation"] == p).to_numpy()].mean(0) - ctrl).max())

    by = {e: [shift(p) for p, v in truth["perturbations"].items() if v["effect"] == e] for e in ("strong", "null")}
    assert by["null"] and max(by["null"]) < 0.5 * min(by["strong"])


def _interaction(x: np.ndarray, b: np.ndarray, k: np.ndarray) -> float:
    """Mean |batch x cell type interaction| of population means (two-way ANOVA residual of the means)."""
    M = np.stack([np.stack([x[(b == i) & (k == j)].mean(0) for j in np.unique(k)]) for i in np.unique(b)])
    R = M - M.mean(0, keepdims=True) - M.mean(1, keepdims=True) + M.mean((0, 1), keepdims=True)  # (B, K, G)
    return float(np.abs(R).mean())


def test_hidden_factors_shift_populations():
    """Hidden factors shift each (batch, cell type): an interaction that additive batch effects cannot make."""
    a = simulate(4000, 200, n_batches=2, seed=0)
    ctrl = (a.obs["perturbation"] == "control").to_numpy()
    x = _log1p_norm(a)[ctrl]
    x = x[:, x.mean(0) > 0.3]
    b, k = a.obs["batch"].cat.codes.to_numpy()[ctrl], a.obs["cell_type"].cat.codes.to_numpy()[ctrl]
    rng = np.random.default_rng(0)
    null = []
    for _ in range(3):  # batch labels shuffled within cell type: no population structure beyond noise
        bp = b.copy()
        for j in np.unique(k):
            bp[k == j] = rng.permutation(bp[k == j])
        null.append(_interaction(x, bp, k))
    assert _interaction(x, b, k) > 1.4 * max(null)


def test_deterministic_by_seed():
    a, b, c = simulate(300, 60, seed=5), simulate(300, 60, seed=5), simulate(300, 60, seed=6)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert json.dumps(a.uns["simulation"]) == json.dumps(b.uns["simulation"])
    assert (a.X != c.X).nnz > 0


@pytest.mark.parametrize("kw", [{"n_cells": 0}, {"n_genes": 3}, {"n_combos": 100}, {"control_fraction": 1.0}])
def test_bad_arguments(kw):
    args = {"n_cells": 100, "n_genes": 50, **kw}
    with pytest.raises(ConfigError, match=next(iter(kw))):
        simulate(args.pop("n_cells"), args.pop("n_genes"), **args)


@pytest.mark.slow
def test_speed_20k_by_1k():
    t = time.perf_counter()
    a = simulate(20_000, 1_000)
    elapsed = time.perf_counter() - t
    assert a.shape == (20_000, 1_000)
    assert elapsed < 10.0, f"simulate(20k, 1k) took {elapsed:.1f} s"
