"""Bring your own control cells: unseen contexts, genes by name, scales, perturbation refusal, output contract,
collapse diagnostic, CLI. One tiny model (trained on planted counts) is shared by the whole module."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import perturbdiff.model._controls as controls_mod
from perturbdiff import Config, DataError, PerturbDiff, collapse_diagnostic, log2_fold_changes
from perturbdiff._logging import logger
from perturbdiff.cli import main
from perturbdiff.data import DataKeys, Split, apply_record, preprocess

N_GENES = 32
UP, DOWN, CTX_SIG = np.arange(8), np.arange(8, 16), {"A": [], "B": np.arange(16, 24), "C": np.arange(24, 32)}
TARGET_SUM = 100.0  # 32 genes: a realistic log1p range (the default 1e4 would put every gene near log1p 6)
SAMPLER = {"steps": 20, "start": "full", "progress": False}  # enough for the planted effects, fast
FAST = {"steps": 5, "start": "full", "progress": False}  # a cheap sampler for tests that check structure only


def planted_counts(cells: dict[tuple[str, str], int], seed: int = 0, ctx_col: str = "cell_type") -> AnnData:
    """Poisson counts: context signatures x3, UP multiplies genes 0-7 by 8, DOWN genes 8-15 by 0.05."""
    rng = np.random.default_rng(seed)
    mu = np.random.default_rng(99).gamma(2.0, 1.0, N_GENES)  # shared base profile
    blocks, obs = [], []
    for (ctx, pert), n in cells.items():
        rate = np.tile(mu, (n, 1)) * rng.lognormal(0.0, 0.3, (n, 1))  # (n, G)
        rate[:, CTX_SIG[ctx]] *= 3.0
        rate[:, UP] *= 8.0 if pert == "UP" else 1.0
        rate[:, DOWN] *= 0.05 if pert == "DOWN" else 1.0
        blocks.append(rng.poisson(rate))
        obs += [(ctx, pert)] * n
    obs_df = pd.DataFrame(obs, columns=[ctx_col, "perturbation"])
    obs_df.index = [f"cell{i}" for i in range(len(obs_df))]
    return AnnData(X=sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs_df,
                   var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


def user_controls(n: dict[str, int] | None = None, seed: int = 1) -> AnnData:
    """The user's control cells: own column name (``donor_type``), context C never seen in training."""
    cells = {(ctx, "control"): k for ctx, k in (n or {"C": 48}).items()}
    adata = planted_counts(cells, seed=seed, ctx_col="donor_type")
    adata.obs = adata.obs.drop(columns="perturbation").assign(note="mine")
    return adata


def tiny(max_steps: int) -> Config:
    cfg = Config.from_preset("tiny").update({"data": {"set_size": 16, "batch_sets": 8}})
    return cfg.update({"train": {"max_steps": max_steps, "val_every": 10_000, "log_every": 50, "warmup_steps": 20,
                                 "lr": 5e-3}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[PerturbDiff, AnnData, str]:
    """A tiny model trained 200 steps (~10 s) on contexts A, B (counts input); saved as a run directory."""
    counts = planted_counts({(c, p): 48 for c in "AB" for p in ("control", "UP", "DOWN")})
    keys = DataKeys("perturbation", "control", ("cell_type",), "counts")
    prep = preprocess(counts, keys, var_names=counts.var_names, target_sum=TARGET_SUM)
    train = [((c,), p) for c in "AB" for p in ("UP", "DOWN")]
    split = Split(name="planted", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=train, val=[], test=[])
    model = PerturbDiff.from_config(tiny(200), prep, split).train(progress=False)
    run = tmp_path_factory.mktemp("run")
    model.save(run)
    return model, prep, str(run)


@contextmanager
def captured_log():
    """Messages of the perturbdiff logger (works whether or not the CLI switched propagation off)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def predicted_X(pred: AnnData) -> np.ndarray:
    return pred[pred.obs["predicted"].to_numpy(bool)].X.toarray()


# -- prediction ------------------------------------------------------------------------------------------------
def test_unseen_context_gets_the_learned_response_and_matches_model_predict(trained):
    model = trained[0]
    ctrl = user_controls()
    with captured_log() as log:
        pred = model.predict_for_controls(ctrl, ["UP", "DOWN"], context_keys="donor_type", input_kind="counts",
                                          **SAMPLER)
    assert any("C of your column 'donor_type'" in m and "<unknown>" in m for m in log), log
    assert set(pred.obs["donor_type"]) == {"C"}
    lfc = log2_fold_changes(pred)
    up, down = lfc.loc[("C", "UP")].to_numpy(), lfc.loc[("C", "DOWN")].to_numpy()
    assert up[UP].mean() > down[UP].mean() + 0.4 and up[UP].mean() > np.delete(up, UP).mean() + 1.0, up
    assert down[DOWN].mean() < up[DOWN].mean() - 0.8, down
    # the same generation path as PerturbDiff.predict on a prepared AnnData in the run's columns
    prepared = apply_record(ctrl, model.record, input_kind="counts")
    prepared.obs = prepared.obs.assign(cell_type=prepared.obs["donor_type"], perturbation="control")
    ref = model.predict([(("C",), "UP"), (("C",), "DOWN")], adata=prepared, include_controls=False, **SAMPLER)
    np.testing.assert_array_equal(ref.X.toarray(), predicted_X(pred))


def test_genes_are_aligned_by_name_shuffled_extra_and_missing(trained):
    model = trained[0]
    ctrl = user_controls()
    kw = {"context_keys": "donor_type", "input_kind": "counts", **FAST}
    base = predicted_X(model.predict_for_controls(ctrl, ["UP"], **kw))
    order = np.random.default_rng(0).permutation(N_GENES)
    extra = sp.csr_matrix((ctrl.n_obs, 2), dtype=np.float32)  # unexpressed: the library sizes stay the same
    shuffled = AnnData(X=sp.hstack([ctrl.X[:, order], extra]).tocsr(), obs=ctrl.obs,
                       var=pd.DataFrame(index=[*ctrl.var_names[order], "extra1", "extra2"]))
    zeroed = ctrl.copy()
    zeroed.X = sp.csr_matrix(zeroed.X.toarray() * (np.arange(N_GENES) < 30))  # the library sizes without g30, g31
    np.testing.assert_allclose(predicted_X(model.predict_for_controls(shuffled, ["UP"], **kw)), base, atol=1e-5)
    partial = shuffled[:, [g not in ("g30", "g31") for g in shuffled.var_names]].copy()
    with pytest.raises(DataError, match="g30.*g31|g31.*g30"):
        model.predict_for_controls(partial, ["UP"], **kw)
    with pytest.warns(UserWarning, match=r"2 of 32 genes \(6%\) are missing and filled with zeros"):
        filled = model.predict_for_controls(partial, ["UP"], missing_genes="zero", **kw)  # 6 %: loudly
    np.testing.assert_allclose(predicted_X(filled), predicted_X(model.predict_for_controls(zeroed, ["UP"], **kw)),
                               atol=1e-5)
    assert list(filled.var_names) == model.genes
    assert filled[~filled.obs["predicted"].to_numpy(bool)][:, ["g30", "g31"]].X.nnz == 0


def test_unknown_perturbation_is_refused_by_name_before_any_compute(trained, monkeypatch):
    model = trained[0]

    def no_compute(*a, **k):
        raise AssertionError("preprocessing ran before the perturbation check")

    monkeypatch.setattr(controls_mod, "apply_record", no_compute)
    for bad, name in (["UP", "NOPE"], "NOPE"), (["UP+KO7"], "KO7"):
        with pytest.raises(DataError, match=name):
            model.predict_for_controls(user_controls(), bad, context_keys="donor_type", input_kind="counts")


def test_unknown_perturbation_for_own_controls_through_the_generic_token_when_asked(trained):
    model = trained[0]
    kw = {"context_keys": "donor_type", "input_kind": "counts", **FAST}
    pred = model.predict_for_controls(user_controls(), ["UP", "NOPE"], unknown_perturbations="generic", **kw)
    assert set(pred.obs.loc[pred.obs["predicted"].to_numpy(bool), "perturbation"]) == {"UP", "NOPE"}


def test_counts_and_log1p_input_give_the_same_prediction(trained):
    import scanpy as sc

    model = trained[0]
    ctrl = user_controls()
    logged = ctrl.copy()
    sc.pp.normalize_total(logged, target_sum=TARGET_SUM)  # the run's recorded target sum
    sc.pp.log1p(logged)
    kw = {"context_keys": "donor_type", **FAST}
    a = model.predict_for_controls(ctrl, ["UP", "DOWN"], input_kind="counts", **kw)
    b = model.predict_for_controls(logged, ["UP", "DOWN"], input_kind="log1p", **kw)
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), atol=1e-5)
    with pytest.raises(DataError, match="non-integer"):
        model.predict_for_controls(logged, ["UP"], input_kind="counts", **kw)


def test_output_contract_cells_and_pseudobulk(trained):
    model = trained[0]
    ctrl = user_controls({"C": 40, "A": 56})
    kw = {"context_keys": ["donor_type"], "input_kind": "counts", "n_samples": 2, "seed": 3, **FAST}
    pred = model.predict_for_controls(ctrl, ["UP", "DOWN", "UP+DOWN"], **kw)
    assert set(pred.obs.columns) == {"perturbation", "donor_type", "sample", "predicted"}
    assert pred.uns["perturbdiff"]["scale"] == "log1p" and pred.X.min() >= 0
    assert list(pred.var_names) == model.genes
    obs = pred.obs
    sizes = obs[obs["predicted"]].groupby(["donor_type", "perturbation", "sample"], observed=True).size()
    assert sizes.to_dict() == {(c, p, s): n for c, n in (("A", 56), ("C", 40))
                               for p in ("UP", "DOWN", "UP+DOWN") for s in (0, 1)}
    ctrl_rows = obs[~obs["predicted"]]
    assert set(ctrl_rows["perturbation"]) == {"control"} and set(ctrl_rows["sample"]) == {-1}
    assert list(ctrl_rows.index) == list(ctrl.obs_names)
    prepared = apply_record(ctrl, model.record, input_kind="counts")
    np.testing.assert_array_equal(pred[ctrl_rows.index].X.toarray(), prepared.X.toarray())
    pb = model.predict_for_controls(ctrl, ["UP", "DOWN", "UP+DOWN"], pseudobulk=True, **kw)
    assert pb.n_obs == 2 * 3 * 2 + 2 and pb.uns["perturbdiff"]["scale"] == "log1p"
    row = pb.obs[(pb.obs["donor_type"] == "C") & (pb.obs["perturbation"] == "DOWN") & (pb.obs["sample"] == 1)]
    cells = (obs["donor_type"] == "C") & (obs["perturbation"] == "DOWN") & (obs["sample"] == 1)
    assert row["n_cells"].tolist() == [40] and bool(row["predicted"].iloc[0])
    np.testing.assert_allclose(pb[row.index].X[0], pred[cells.to_numpy()].X.toarray().mean(0), rtol=1e-5)
    assert pb.obs.loc[~pb.obs["predicted"], "n_cells"].sort_values().tolist() == [40, 56]
    with pytest.raises(DataError, match="pseudobulk"):
        log2_fold_changes(pb)


def test_n_cells_and_column_checks_name_the_column(trained):
    model = trained[0]
    ctrl = user_controls({"C": 20})
    pred = model.predict_for_controls(ctrl, ["UP"], context_keys="donor_type", input_kind="counts", n_cells=7,
                                      **FAST)
    assert int(pred.obs["predicted"].sum()) == 7
    with pytest.raises(DataError, match="celltype"):
        model.predict_for_controls(ctrl, ["UP"], context_keys="celltype", input_kind="counts")
    with pytest.raises(DataError, match="cell_type"):  # two user columns for the run's one
        model.predict_for_controls(ctrl, ["UP"], context_keys=["donor_type", "note"], input_kind="counts")
    mixed = ctrl.copy()
    mixed.obs["perturbation"] = ["control"] * 19 + ["UP"]
    with pytest.raises(DataError, match="'perturbation'.*UP"):
        model.predict_for_controls(mixed, ["UP"], context_keys="donor_type", input_kind="counts")


def test_doses_are_required_known_and_written(tmp_path):
    counts = planted_counts({(c, p): 16 for c in "AB" for p in ("control", "UP")})
    counts.obs["dose"] = np.where(counts.obs["perturbation"] == "control", "0", np.tile(["1", "10"], 32 * 2)[:64])
    keys = DataKeys("perturbation", "control", ("cell_type",), "counts", dose_key="dose")
    prep = preprocess(counts, keys, var_names=counts.var_names, target_sum=TARGET_SUM)
    split = Split(name="d", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=[(("A",), "UP"), (("B",), "UP")], val=[], test=[])
    model = PerturbDiff.from_config(tiny(2), prep, split).train(progress=False)
    kw = {"context_keys": "donor_type", "input_kind": "counts", **FAST}
    with pytest.raises(DataError, match="'dose'"):
        model.predict_for_controls(user_controls({"C": 16}), ["UP"], **kw)
    with pytest.raises(DataError, match="'high'.*a number >= 0 or one of 0, 1, 10"):
        model.predict_for_controls(user_controls({"C": 16}), ["UP"], doses=["high"], **kw)
    pred = model.predict_for_controls(user_controls({"C": 16}), ["UP"], doses=["1", "10"], **kw)
    p = pred.obs[pred.obs["predicted"]]
    assert p.groupby("dose", observed=True).size().to_dict() == {"1": 16, "10": 16}
    assert set(log2_fold_changes(pred).index) == {("C", "UP", "1"), ("C", "UP", "10")}


# -- fold changes and the collapse diagnostic (hand-made predictions, no model) -------------------------------------
def handmade(shifts: dict[str, np.ndarray], base: np.ndarray, ctx: str = "X", n: int = 4) -> AnnData:
    """A prediction layout: n control cells at ``base`` and n predicted cells per label at ``base + shift``."""
    rows = [base] * n + [base + s for s in shifts.values() for _ in range(n)]
    obs = pd.DataFrame({"ct": ctx, "perturbation": ["ctl"] * n + [p for p in shifts for _ in range(n)],
                        "sample": [-1] * n + [0] * (n * len(shifts)), "predicted": [False] * n + [True] * n * len(
                            shifts)}, index=[f"c{i}" for i in range(n * (1 + len(shifts)))])
    pred = AnnData(X=sp.csr_matrix(np.asarray(rows, np.float32)), obs=obs,
                   var=pd.DataFrame(index=[f"g{i}" for i in range(len(base))]))
    lay = {"context_keys": ["ct"], "pert_key": "perturbation", "control": "ctl", "dose_key": None}
    pred.uns["perturbdiff"] = {"scale": "log1p", "apply": json.dumps(lay)}
    return pred


def reference(shifts: dict[str, np.ndarray], base: np.ndarray, contexts=("R1", "R2")) -> AnnData:
    """A preprocessed (log1p, with record) training AnnData whose mean shifts are ``shifts``."""
    parts = [handmade(shifts, base, ctx=c) for c in contexts]
    X = sp.vstack([p.X for p in parts]).tocsr()
    obs = pd.concat([p.obs for p in parts])[["ct", "perturbation"]].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=parts[0].var_names))
    return preprocess(adata, DataKeys("perturbation", "ctl", ("ct",), "log1p"), var_names=adata.var_names)


def test_log2_fold_changes_formula():
    base = np.array([0.0, 1.0, 2.0, 0.5])
    pred = handmade({"P": np.array([1.0, 0.0, -1.0, 0.0])}, base)
    lfc = log2_fold_changes(pred, eps=0.01)
    expect = np.log2((np.expm1(base + [1.0, 0.0, -1.0, 0.0]) + 0.01) / (np.expm1(base) + 0.01))
    np.testing.assert_allclose(lfc.loc[("X", "P")].to_numpy(), expect, rtol=1e-5)
    assert lfc.index.names == ["ct", "perturbation"]


def test_collapse_diagnostic_warns_only_when_the_training_shifts_differ():
    rng = np.random.default_rng(0)
    base, s = rng.uniform(1, 2, 50), rng.normal(0, 0.5, 50)
    same = handmade({"P1": s, "P2": 1.1 * s + rng.normal(0, 0.01, 50)}, base)
    with pytest.warns(UserWarning, match="context.*X.*could not be checked"):
        report = collapse_diagnostic(same)
    assert report["collapsed"].tolist() == [True] and report["min_r"].iloc[0] > 0.99
    with pytest.warns(UserWarning, match="less alike"):
        report = collapse_diagnostic(same, reference({"P1": s, "P2": rng.normal(0, 0.5, 50)}, base))
    assert report["reference_r"].iloc[0] < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = collapse_diagnostic(same, reference({"P1": s, "P2": s * 0.9}, base))  # real shifts alike too
        assert not report["collapsed"].any() and report["reference_r"].iloc[0] > 0.95
        distinct = collapse_diagnostic(handmade({"P1": s, "P2": rng.normal(0, 0.5, 50)}, base))
    assert not distinct["collapsed"].any() and distinct["min_r"].iloc[0] < 0.5


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_predict_with_controls_end_to_end(trained, tmp_path, capsys):
    run = trained[2]
    user_controls({"C": 24}).write_h5ad(tmp_path / "mine.h5ad")
    (tmp_path / "perts.txt").write_text("UP  # raises genes 0-7\nDOWN\n")
    args = ["predict", run, "--controls", str(tmp_path / "mine.h5ad"), "--perturbations", f"@{tmp_path}/perts.txt",
            "--context-keys", "donor_type", "--input-kind", "counts", "--steps", "5", "--start", "full",
            "--no-progress", "--n-samples", "2"]
    assert main([*args, "--out", str(tmp_path / "pred.h5ad")]) == 0
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.obs.groupby(["perturbation", "sample"], observed=True).size().to_dict() == {
        ("DOWN", 0): 24, ("DOWN", 1): 24, ("UP", 0): 24, ("UP", 1): 24, ("control", -1): 24}
    assert pred.uns["perturbdiff"]["scale"] == "log1p"
    assert main([*args, "--pseudobulk", "--out", str(tmp_path / "pb.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "pb.h5ad").n_obs == 2 * 2 + 1
    capsys.readouterr()
    assert main([*args[:5], "NOPE,UP", *args[6:], "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert main([*args, "--data", str(tmp_path / "mine.h5ad"), "--out", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--controls" in err
    assert main(["predict", run, "--controls", str(tmp_path / "mine.h5ad"), "--perturbations", "UP",
                 "--context-keys", "donor_type", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "--input-kind" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()
    trained[1].write_h5ad(tmp_path / "prep.h5ad")  # the split mode still works, and refuses --controls-only flags
    split_args = ["predict", run, "--data", str(tmp_path / "prep.h5ad"), "--subset", "train", "--n-cells", "3",
                  "--steps", "2", "--start", "full", "--no-progress", "--out", str(tmp_path / "split.h5ad")]
    assert main(split_args) == 0 and ad.read_h5ad(tmp_path / "split.h5ad").obs["predicted"].sum() == 4 * 3
    assert main([*split_args, "--pseudobulk"]) == 2 and "--pseudobulk" in capsys.readouterr().err
    assert main(["info", run]) == 0
    out = capsys.readouterr().out
    assert "seen in training (2): DOWN, UP" in out and "representable" in out and "<unknown>" in out
