"""Perturbations never seen in training (issue 14): the prior routes, the combination set encoder, the routes a
prediction reports, and the baselines of that setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from perturbdiff import ConfigError, DataError, PerturbDiff
from perturbdiff._config_rules import guidance_weights
from perturbdiff.baselines import make_baseline
from perturbdiff.config import Config
from perturbdiff.data import DataKeys, Split, preprocess
from perturbdiff.data._priors import (
    coexpression_block,
    effects_block,
    knowledge_block,
    parse_routes,
    part_shifts,
)
from perturbdiff.nn import CovariateEncoder

N_PROGRAMS, PER_PROGRAM = 4, 8
KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p")


def program_data(n_per_group: int = 80, seed: int = 0) -> tuple[AnnData, Split]:
    """Genes g0..g31 in 4 co-expressed programs of 8 (a shared per-cell activity); perturbing gene gX raises its
    own program's genes by +1.5. Training perturbs 3 genes per program; g1 (program 0) and g9 (program 1) are held
    out everywhere; two contexts."""
    rng = np.random.default_rng(seed)
    G = N_PROGRAMS * PER_PROGRAM
    program = np.repeat(np.arange(N_PROGRAMS), PER_PROGRAM)
    trained = [f"g{k * PER_PROGRAM + j}" for k in range(N_PROGRAMS) for j in (2, 3, 4)]
    labels = ["control", *trained, "g1", "g9"]
    blocks, obs = [], []
    for ctx in ("A", "B"):
        for p in labels:
            act = rng.gamma(2.0, 0.5, size=(n_per_group, N_PROGRAMS))[:, program]  # (n, G) program activity
            x = act + rng.gamma(1.0, 0.3, size=(n_per_group, G)) + (0.3 if ctx == "B" else 0.0)
            if p != "control":
                x[:, program == program[int(p[1:])]] += 1.5
            blocks.append(x)
            obs += [(ctx, p)] * n_per_group
    adata = AnnData(X=sp.csr_matrix(np.vstack(blocks).astype(np.float32)),
                    obs=pd.DataFrame(obs, columns=["cell_type", "perturbation"]).astype("category"),
                    var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    adata.obs.index = adata.obs.index.astype(str)
    prep = preprocess(adata, KEYS, var_names=list(adata.var_names))
    split = Split(name="programs", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=[((c,), p) for c in ("A", "B") for p in trained], val=[(("A",), "g9")],
                  test=[(("B",), "g1")])
    return prep, split


def prior_config(prior: str, **model) -> Config:
    cfg = Config.from_preset("tiny").update({"data": {"set_size": 16, "batch_sets": 8}})
    return cfg.update({"model": {"pert_prior": prior, "prior_dim": 8, "prior_neighbours": 5, **model},
                       "diffusion.process": "flow", "sample.steps": 8,
                       "train": {"max_steps": 400, "val_every": 200, "log_every": 50, "warmup_steps": 20}})


def _response(adata: AnnData, cond) -> np.ndarray:
    (ctx,), p = cond
    ctx_rows = (adata.obs["cell_type"] == ctx).to_numpy()
    pick = ctx_rows & (adata.obs["perturbation"] == p).to_numpy()
    ctrl = ctx_rows & (adata.obs["perturbation"] == "control").to_numpy()
    return np.asarray(adata.X[pick].mean(0) - adata.X[ctrl].mean(0)).ravel()


@pytest.fixture(scope="module")
def program_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior")
    adata, split = program_data()
    model = PerturbDiff.from_config(prior_config("coexpression"), adata, split)
    model.train(out_dir=out, progress=False, device="cpu")
    return model, adata, split, out


# -- the routes ---------------------------------------------------------------------------------------------------
def test_coexpression_embeds_a_gene_next_to_its_program():
    adata, split = program_data()
    block = coexpression_block(adata.X, np.arange(adata.n_obs), list(adata.var_names), dim=6, neighbours=5, seed=0)
    assert block.labels == list(adata.var_names) and block.matrix.shape == (32, 6)
    e = block.matrix / np.linalg.norm(block.matrix, axis=1, keepdims=True)
    sim = e @ e.T
    program = np.repeat(np.arange(N_PROGRAMS), PER_PROGRAM)
    same = program[:, None] == program[None, :]
    off = ~np.eye(32, dtype=bool)
    assert sim[same & off].mean() > 0.8 and sim[~same].mean() < 0.3, (sim[same & off].mean(), sim[~same].mean())


def test_effect_profiles_decompose_combinations_and_place_unseen_parts_among_neighbours():
    rng = np.random.default_rng(0)
    u = {q: rng.normal(size=20) for q in "ABC"}
    shifts = {"A": u["A"], "B": u["B"], "A+C": u["A"] + u["C"]}  # C was only ever seen in a combination
    parts_of = {"A": ["A"], "B": ["B"], "A+C": ["A", "C"]}
    parts, prof = part_shifts(shifts, parts_of)
    assert parts == ["A", "B", "C"]
    np.testing.assert_allclose(prof[2], u["C"], atol=1e-2)
    from perturbdiff.data._priors import PriorBlock

    knowledge = PriorBlock("knowledge", ["A", "B", "C", "D", "E"],
                           np.array([[1, 0], [0, 1], [1, 1], [0.9, 0.1], [-1, -1]], np.float32))
    block = effects_block(shifts, parts_of, dim=2, neighbours=1, similarity=[knowledge], seed=0)
    assert block.labels[:3] == ["A", "B", "C"] and block.placed == {"D": ["A"]}  # E: no positive similarity
    np.testing.assert_allclose(block.matrix[3], block.matrix[0])  # D sits on its one neighbour A


def test_the_knowledge_route_reads_the_hpo_annotations_installed_with_the_package():
    block = knowledge_block(dim=16, seed=0)
    assert len(block.labels) > 5000 and block.matrix.shape == (len(block.labels), 16)
    assert {"FOXL2", "CEBPE", "MAPK1", "BPGM"} <= set(block.labels)
    assert np.isfinite(block.matrix).all()


def test_prior_routes_are_checked_in_one_line():
    assert parse_routes("effects, knowledge") == ["effects", "knowledge"]
    with pytest.raises(ConfigError, match="unknown route 'genept'"):
        parse_routes("genept")
    with pytest.raises(ConfigError, match="model.pert_prior"):
        Config().update({"model.pert_prior": "coexpression,go"}).validate()


# -- the combination set encoder ----------------------------------------------------------------------------------
def test_combinations_are_order_invariant_and_the_interaction_starts_at_zero():
    torch.manual_seed(0)
    enc = CovariateEncoder({"pert": 8, "contexts": [2]}, 6, 12, interaction=True).eval()
    torch.nn.init.normal_(enc.pair.weight)  # a trained, non-zero pairwise term
    cov = {"pert": torch.tensor([[3, 4, 5], [5, 3, 4], [4, 5, 3]]), "context": torch.zeros(3, 1, dtype=torch.long),
           "batch": torch.zeros(3, dtype=torch.long), "dose": torch.zeros(3, dtype=torch.long)}
    out = enc(cov)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    single = {**cov, "pert": torch.tensor([[3, 0, 0]])}
    plain = CovariateEncoder({"pert": 8, "contexts": [2]}, 6, 12).eval()
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("pair.")})
    torch.testing.assert_close(enc(single), plain(single))  # one part: no pairwise term
    fresh = CovariateEncoder({"pert": 8, "contexts": [2]}, 6, 12, interaction=True)
    assert not fresh.pair.weight.any() and not fresh.pair.bias.any()


# -- a run through the prior -------------------------------------------------------------------------------------
def test_an_unseen_perturbation_of_a_program_gene_beats_the_mean_over_training_perturbations(program_run):
    model, adata, split, _ = program_run
    cond = (("B",), "g1")
    truth = _response(adata, cond)
    pred = model.predict([cond], n_cells=200, include_controls=False, progress=False)
    ctrl = np.asarray(adata.X[((adata.obs["cell_type"] == "B") & (adata.obs["perturbation"] == "control"))
                              .to_numpy()].mean(0)).ravel()
    ours = np.asarray(pred.X.mean(0)).ravel() - ctrl
    mean = make_baseline("train_mean").fit(adata, split, KEYS).predict([cond], [200], seed=0)
    base = np.asarray(mean.X.mean(0)).ravel() - ctrl
    err_ours, err_mean = np.abs(ours - truth).mean(), np.abs(base - truth).mean()
    assert err_ours < 0.7 * err_mean, (err_ours, err_mean)
    program0 = slice(0, PER_PROGRAM)
    assert ours[program0].mean() > 2 * np.delete(ours, np.r_[program0]).mean()  # its own program moves


def test_the_route_is_reported_recorded_and_reloaded(program_run, tmp_path):
    model, adata, split, out = program_run
    pred = model.predict([(("B",), "g1"), (("B",), "g2")], n_cells=4, include_controls=False, progress=False)
    import json

    routes = json.loads(pred.uns["perturbdiff"]["routes"])
    assert routes == {"g1": {"g1": "coexpression"}, "g2": {"g2": "learned + coexpression"}}
    loaded = PerturbDiff.load(out, adata=adata)
    assert loaded.routes(["g1+g2"]) == {"g1+g2": {"g1": "coexpression", "g2": "learned + coexpression"}}
    assert loaded.summary["prior_blocks"][0]["route"] == "coexpression"
    torch.testing.assert_close(loaded.network.cov_encoder.pert_table, model.network.cov_encoder.pert_table)


def test_info_names_the_prior_routes(program_run, capsys):
    from perturbdiff.cli import main

    _, _, _, out = program_run
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "more through coexpression" in text and "prior coexpression: 32 labels, 8 dimensions" in text


def test_a_label_no_route_represents_fails_in_one_line(program_run):
    model, *_ = program_run
    with pytest.raises(DataError, match=r"covered by no prior or embedding table: NOTAGENE; train with a prior"):
        model.predict([(("B",), "NOTAGENE")], n_cells=4, progress=False)
    generic = model.routes(["NOTAGENE+g1"])
    assert generic == {"NOTAGENE+g1": {"NOTAGENE": "generic", "g1": "coexpression"}}


# -- baselines of the unseen setting ------------------------------------------------------------------------------
def test_the_mean_over_training_perturbations_and_the_knn_baseline():
    adata, split = program_data(n_per_group=40)
    cond = (("B",), "g1")
    truth = _response(adata, cond)
    mean = make_baseline("train_mean").fit(adata, split, KEYS)
    expected = np.mean([_response(adata, c) for c in split.train if c[0] == ("B",)], axis=0)
    np.testing.assert_allclose(mean.delta(*cond), expected, atol=1e-5)
    block = coexpression_block(adata.X, np.arange(adata.n_obs), list(adata.var_names), dim=6, neighbours=5, seed=0)
    knn = make_baseline("knn", table=(block.labels, block.matrix), k=3).fit(adata, split, KEYS)
    assert set(knn.neighbours("g1")) == {"g2", "g3", "g4"}  # its program's trained genes
    assert np.abs(knn.delta(*cond) - truth).mean() < 0.5 * np.abs(mean.delta(*cond) - truth).mean()
    with pytest.raises(DataError, match="NOTAGENE"):
        knn.predict([(("B",), "NOTAGENE")], [5])


def test_knn_gives_a_part_nothing_places_the_mean_single_shift_with_unseen_mean():
    adata, split = program_data(n_per_group=40)
    block = coexpression_block(adata.X, np.arange(adata.n_obs), list(adata.var_names), dim=6, neighbours=5, seed=0)
    table = (block.labels, block.matrix)
    zero = make_baseline("knn", table=table, k=3, unseen="zero").fit(adata, split, KEYS)
    mean = make_baseline("knn", table=table, k=3, unseen="mean").fit(adata, split, KEYS)
    singles = [c for c in split.train if c[0] == ("B",) and "+" not in c[1]]
    expected = np.mean([_response(adata, c) for c in singles], axis=0)
    assert np.abs(expected).max() > 0.1  # the planted programs shift something, so the fallback is not zero
    np.testing.assert_allclose(mean.delta(("B",), "NOTAGENE"), expected, atol=1e-5)
    np.testing.assert_allclose(zero.delta(("B",), "NOTAGENE"), 0.0)
    # a known part keeps its own route and the unknown one adds the mean: order-invariant like every combination
    both = mean.delta(("B",), "g1+NOTAGENE")
    np.testing.assert_allclose(both, zero.delta(("B",), "g1") + expected, atol=1e-5)
    np.testing.assert_allclose(both, mean.delta(("B",), "NOTAGENE+g1"), atol=1e-6)
    with pytest.raises(ConfigError, match="unseen must be one of 'error', 'zero', 'mean'"):
        make_baseline("knn", unseen="typo")


# -- doses ----------------------------------------------------------------------------------------------------------
def dose_data(n_per_group: int = 60, seed: int = 0) -> tuple[AnnData, Split, DataKeys]:
    """Perturbation UP raises genes 0-7 by 0.4·ln(1 + dose) in two contexts; trained at doses 1, 10 and 1000 in A
    and B; the test condition B/UP was measured at 10 (a quarter of its cells) and 1000."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for ctx in ("A", "B"):
        for p, doses in (("control", ["0"]), ("UP", ["1", "10", "1000"])):
            for d in doses:
                n = n_per_group // 4 if (ctx, d) == ("B", "10") else n_per_group
                x = rng.gamma(2.0, 0.4, size=(n, 24)) + (0.3 if ctx == "B" else 0.0)
                x[:, :8] += 0.4 * np.log1p(float(d))
                rows.append(x)
                obs += [(ctx, p, d)] * n
    keys = DataKeys("perturbation", "control", ("cell_type",), "log1p", dose_key="dose")
    adata = AnnData(X=sp.csr_matrix(np.vstack(rows).astype(np.float32)),
                    obs=pd.DataFrame(obs, columns=["cell_type", "perturbation", "dose"]).astype("category"),
                    var=pd.DataFrame(index=[f"g{i}" for i in range(24)]))
    adata.obs.index = adata.obs.index.astype(str)
    prep = preprocess(adata, keys, var_names=list(adata.var_names))
    split = Split(name="doses", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=[(("A",), "UP")], val=[], test=[(("B",), "UP")])
    return prep, split, keys


@pytest.fixture(scope="module")
def dose_run():
    adata, split, keys = dose_data()
    cfg = prior_config("").update({"train.val_every": 400})
    return PerturbDiff.from_config(cfg, adata, split).train(progress=False, device="cpu"), adata, split


def _shift_at(model, adata, dose: str) -> float:
    pred = model.predict([(("A",), "UP")], n_cells=300, include_controls=False, progress=False, doses=[dose])
    ctrl = adata.X[((adata.obs["cell_type"] == "A") & (adata.obs["perturbation"] == "control")).to_numpy()]
    return float(np.asarray(pred.X[:, :8].mean(0) - ctrl[:, :8].mean(0)).mean())


def test_a_dose_never_seen_is_placed_between_the_seen_ones(dose_run):
    model, adata, _ = dose_run
    assert model.network.cov_encoder.dose_mlp is not None
    low, mid, high = (_shift_at(model, adata, d) for d in ("10", "100", "1000"))
    truth = 0.4 * np.log1p(100.0)  # 1.85; the seen neighbours' truths are 0.96 and 2.76
    assert low < mid < high, (low, mid, high)
    assert abs(mid - truth) < 0.45, (mid, truth)


def test_split_predict_generates_each_condition_at_its_measured_doses(dose_run):
    model, adata, split = dose_run
    pred = model.predict(progress=False, include_controls=True)
    cells = pred.obs[pred.obs["predicted"]]
    real = adata.obs[(adata.obs["cell_type"] == "B") & (adata.obs["perturbation"] == "UP")]
    assert cells["dose"].astype(str).value_counts().to_dict() == real["dose"].astype(str).value_counts().to_dict()
    ctrl = pred.obs[~pred.obs["predicted"]]
    assert set(ctrl["dose"].astype(str)) == {"0"}  # the real controls keep their dose
    by_dose = {d: float(pred.X[(pred.obs["predicted"] & (pred.obs["dose"] == d)).to_numpy(), :8].mean())
               for d in ("10", "1000")}
    assert by_dose["1000"] > by_dose["10"] + 0.8, by_dose  # not one dose for all: the truth differs by 1.8


def test_token_only_doses_refuse_a_dose_never_seen():
    adata, split, _ = dose_data(n_per_group=16)
    cfg = prior_config("", continuous_dose=False).update({"train": {"max_steps": 2, "val_every": 2}})
    model = PerturbDiff.from_config(cfg, adata, split).train(progress=False, device="cpu")
    assert model.network.cov_encoder.dose_mlp is None
    with pytest.raises(DataError, match="'100' was not seen in training .*tokens only"):
        model.predict([(("A",), "UP")], n_cells=4, progress=False, doses=["100"])


def test_validation_generates_at_the_validation_cells_doses(dose_run):
    model, adata, split = dose_run
    from perturbdiff.data import CellSetIndex

    cond = (("B",), "UP")
    groups = CellSetIndex.build(adata, model.keys, [cond]).groups
    owner, doses, counts = model._dose_units(adata, groups, [40], [cond])
    assert owner == [0, 0, 0] and doses == ["1", "1000", "10"] and counts == [18, 18, 4]  # 40 in 60 : 60 : 15
    model.split = Split(**{**split.__dict__, "val": [cond]})
    own = model.adata
    model.adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # the first 2S cells: all doses
    seen, cells = [], model._cells

    def spy(*args, **kw):
        seen.append(kw.get("doses"))
        return cells(*args, **kw)

    model._cells = spy
    try:
        scores = model._validator("cpu")(model.network)
    finally:
        del model._cells
        model.adata = own
    # one generation per candidate guidance weight (preset tiny chooses among several), each at every dose
    weights = guidance_weights(model.cfg.train.val_guidance) or [model.cfg.sample.guidance]
    assert len(seen) == len(weights) and all(sorted(s) == ["1", "10", "1000"] for s in seen), seen
    assert np.isfinite(scores["val_ed"]) and scores["val_pearson_delta"] > 0.5, scores
