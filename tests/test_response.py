"""Response summaries in perturbdiff.evaluate (log2 fold changes, pseudobulks, the collapse diagnostic) on hand-made
predictions: layout from ``apply`` or from the run's ``record``, sparse and dense X, two contexts, pseudobulk rows
(weighted means) and a reference. Their formulas are checked directly and, while perturbdiff._apply still holds its
own copies, against those (exact equality)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import DataError
from perturbdiff.data import DataKeys
from perturbdiff.evaluate import collapse_diagnostic, log2_fold_changes, pseudobulk_of

PERT, CTX, CTRL = "perturbation", "ct", "ctl"
KEYS = DataKeys(PERT, CTRL, (CTX,), "log1p")


@pytest.fixture(scope="module")
def old():
    """perturbdiff._apply while it has its own copies of these functions, else None (the comparisons are skipped)."""
    try:
        import perturbdiff._apply as apply
    except ImportError:
        return None
    return apply if hasattr(apply, "_pred_and_controls") else None


def prediction(seed: int = 0, *, dense: bool = False, record: bool = True, n: int = 5, g: int = 12) -> AnnData:
    """Control cells (predicted=False, sample -1) and 2 samples of 3 perturbations in 2 contexts (log1p)."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for ctx in ("A", "B"):
        base = rng.uniform(0.2, 2.0, g)
        rows.append(base + rng.normal(0, 0.1, (n, g)))
        obs += [(ctx, CTRL, -1, False)] * n
        for pert in ("P1", "P2", "P3"):
            shift = rng.normal(0, 0.5, g)
            for sample in (0, 1):
                rows.append(base + shift + rng.normal(0, 0.1, (n, g)))
                obs += [(ctx, pert, sample, True)] * n
    X = np.clip(np.vstack(rows), 0, None).astype(np.float32)
    X[X < 0.3] = 0.0  # some zeros, as in log1p data
    frame = pd.DataFrame(obs, columns=[CTX, PERT, "sample", "predicted"], index=[f"c{i}" for i in range(len(obs))])
    pred = AnnData(X=X if dense else sp.csr_matrix(X), obs=frame, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    if record:
        rec = {"format": 1, "genes": list(pred.var_names), "keys": KEYS.to_dict()}
        pred.uns["perturbdiff"] = {"record": json.dumps(rec)}
    else:
        lay = {"context_keys": [CTX], "pert_key": PERT, "control": CTRL, "dose_key": None}
        pred.uns["perturbdiff"] = {"apply": json.dumps(lay)}
    return pred


def reference(seed: int = 5) -> AnnData:
    """Training-like data with a record: the prediction's layout with every cell real."""
    ref = prediction(seed)
    ref.obs = ref.obs[[CTX, PERT]]
    return ref


def quiet(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("record", [True, False])
def test_log2_fold_changes_as_before(old, dense, record):
    pred = prediction(dense=dense, record=record)
    new = log2_fold_changes(pred)
    assert new.index.names == [CTX, PERT] and len(new) == 6
    X = np.expm1(np.asarray(pred.X.toarray() if sp.issparse(pred.X) else pred.X, np.float64))
    cells = lambda pert: ((pred.obs[CTX] == "B") & (pred.obs[PERT] == pert)).to_numpy()  # noqa: E731
    expect = np.log2((X[cells("P2")].mean(0) + 0.01) / (X[cells(CTRL)].mean(0) + 0.01))
    np.testing.assert_allclose(new.loc[("B", "P2")].to_numpy(), expect, rtol=1e-5)  # expm1 in float32
    if old is not None:
        pd.testing.assert_frame_equal(new, old.log2_fold_changes(pred), check_exact=True)
        pd.testing.assert_frame_equal(log2_fold_changes(pred, eps=0.5), old.log2_fold_changes(pred, eps=0.5))


@pytest.mark.parametrize("dense", [False, True])
def test_pseudobulk_of_as_before(old, dense):
    pred = prediction(dense=dense)
    new = pseudobulk_of(pred)
    assert new.X.dtype == np.float32 and new.n_obs == 2 * (1 + 3 * 2) and set(new.obs["n_cells"]) == {5}
    row = ((new.obs[CTX] == "A") & (new.obs[PERT] == "P3") & (new.obs["sample"] == 1)).to_numpy()
    cells = ((pred.obs[CTX] == "A") & (pred.obs[PERT] == "P3") & (pred.obs["sample"] == 1)).to_numpy()
    X = np.asarray(pred.X.toarray() if sp.issparse(pred.X) else pred.X, np.float64)
    np.testing.assert_allclose(new.X[row][0], X[cells].mean(0), rtol=1e-6)
    if old is not None:
        before = old.pseudobulk_of(pred)
        np.testing.assert_array_equal(np.asarray(new.X), np.asarray(before.X))
        pd.testing.assert_frame_equal(new.obs, before.obs)
        assert new.uns["perturbdiff"] == before.uns["perturbdiff"]
    with pytest.raises(DataError, match="pseudobulk"):
        log2_fold_changes(new)


@pytest.mark.parametrize("collapse", [False, True])
def test_collapse_diagnostic_as_before(old, collapse):
    pred = prediction(seed=3)
    if collapse:  # every perturbation's cells alike: the responses collapse
        X = pred.X.toarray()
        is_pred = pred.obs["predicted"].to_numpy()
        for ctx in ("A", "B"):
            rows = np.flatnonzero(is_pred & (pred.obs[CTX] == ctx).to_numpy())
            X[rows] = X[rows[: len(rows) // 6]][np.arange(len(rows)) % (len(rows) // 6)]
        pred.X = sp.csr_matrix(X)
    for args in ((pred,), (pred, reference()), (pseudobulk_of(pred),)):
        new, new_warned = quiet(collapse_diagnostic, *args)
        assert bool(new_warned) == collapse and new["collapsed"].tolist() == [collapse, collapse]
        assert new["n_perturbations"].tolist() == [3, 3] and (new["min_r"] > 0.99).all() == collapse
        if old is not None:
            before, old_warned = quiet(old.collapse_diagnostic, *args)
            pd.testing.assert_frame_equal(new, before, check_exact=True)
            assert new_warned == old_warned


def test_controls_are_needed_for_every_context(old):
    pred = prediction()
    pred = pred[~((pred.obs[CTX] == "B") & ~pred.obs["predicted"]).to_numpy()].copy()
    for fn in (log2_fold_changes, *([old.log2_fold_changes] if old is not None else [])):
        with pytest.raises(DataError, match="context\\(s\\) B"):
            fn(pred)
