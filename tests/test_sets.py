"""Cell-set sampler: one condition per set, matched controls, padding, determinism, control sets, loader."""

from __future__ import annotations

import logging
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from perturbdiff._logging import logger
from perturbdiff.data import CellSetDataset, CellSetIndex, DataKeys, Vocab, make_loader

KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p", batch_key="batch")
S = 8


def tiny_adata(seed: int = 0) -> ad.AnnData:
    """Cell types x batches x (control, A, B, C) with uneven group sizes; NK has no b2 controls, Mono none.

    X[:, 0] = row + 1 so a set's rows can be read back from its values.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for ct in ["T", "B", "NK", "Mono"]:
        for b in ["b1", "b2"]:
            for p in ["control", "A", "B", "C"]:
                if p == "control" and (ct == "Mono" or (ct == "NK" and b == "b2")):
                    continue
                rows += [(ct, b, p)] * int(rng.integers(1, 30))
    obs = pd.DataFrame(rows, columns=["cell_type", "batch", "perturbation"]).astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    X = sp.random(len(obs), 12, density=0.2, format="lil", dtype=np.float32, random_state=seed)
    X[:, 0] = np.arange(1, len(obs) + 1, dtype=np.float32)[:, None]
    return ad.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=obs)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return tiny_adata()


@pytest.fixture(scope="module")
def conditions(adata) -> list:
    return sorted({((c,), p) for c, p in zip(adata.obs["cell_type"], adata.obs["perturbation"]) if p != "control"})


def make_ds(adata, conditions, **kw) -> CellSetDataset:
    index = CellSetIndex.build(adata, KEYS, conditions)
    vocab = Vocab.build(adata, KEYS, conditions)
    args = {"set_size": S, "seed": 0, **kw}
    return CellSetDataset(adata, index, vocab, **args)


def rows_of(x: torch.Tensor) -> np.ndarray:
    """Row indices from values: X[:, 0] / scale = (row + 1) / 10."""
    return np.rint(x[..., 0].numpy() * 10).astype(int) - 1


def all_sets(ds: CellSetDataset) -> dict:
    return ds.__getitems__(list(range(len(ds)))).batched


def test_getitem_shapes_and_model_space(adata, conditions):
    ds = make_ds(adata, conditions)
    item = ds[0]
    assert item["target"].shape == (S, 12) and item["control"].shape == (S, 12) and item["pad"].shape == (S,)
    assert item["target"].dtype == torch.float32 and item["pad"].dtype == torch.bool
    assert item["pert"].shape == (1,) and item["context"].shape == (1,) and item["cond"].shape == ()
    rows = rows_of(item["target"])
    np.testing.assert_allclose(item["target"].numpy(), adata.X[rows].toarray() / 10.0, rtol=1e-6)


def test_one_condition_per_set_and_matched_controls(adata, conditions):
    ds = make_ds(adata, conditions)
    b = all_sets(ds)
    obs = adata.obs
    ct, pert, batch = (obs[k].astype(str).to_numpy() for k in ["cell_type", "perturbation", "batch"])
    for i in range(len(ds)):
        (c,), p = conditions[int(b["cond"][i])]
        t, k = rows_of(b["target"][i]), rows_of(b["control"][i])
        assert set(ct[t]) == {c} and set(pert[t]) == {p} and len(set(batch[t])) == 1  # one unit per set
        assert set(pert[k]) == {"control"}
        if c == "Mono" or (c == "NK" and batch[t[0]] == "b2"):  # fallback: same batch, other contexts
            assert set(batch[k]) == {batch[t[0]]}
        else:
            assert set(ct[k]) == {c} and set(batch[k]) == {batch[t[0]]}
            assert len(set(k)) == min(S, int(((ct == c) & (batch == batch[t[0]]) & (pert == "control")).sum()))


def test_padding_flags_and_real_cell_counts(adata, conditions):
    ds = make_ds(adata, conditions)
    b = all_sets(ds)
    rows, pad = rows_of(b["target"]), b["pad"].numpy()
    for i, g in enumerate(ds.index.groups):
        sel = b["cond"].numpy() == i
        real, padded = rows[sel][~pad[sel]], rows[sel][pad[sel]]
        assert sorted(real.tolist()) == sorted(g.tolist())  # every real cell exactly once
        assert set(padded.tolist()) <= set(g.tolist())  # padded copies come from the group
        n_units = [len(r) for r, c in zip(ds.index.unit_rows, ds.index.unit_cond) if c == i]
        assert len(padded) == sum((-n) % S for n in n_units)


def test_deterministic_by_seed_and_epoch(adata, conditions):
    a, b = make_ds(adata, conditions), make_ds(adata, conditions)
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(all_sets(a)["target"], all_sets(b)["target"])
    assert torch.equal(all_sets(a)["control"], all_sets(b)["control"])
    b.set_epoch(4)
    assert not torch.equal(all_sets(a)["target"], all_sets(b)["target"])
    c = make_ds(adata, conditions, seed=1)
    c.set_epoch(3)
    assert not torch.equal(all_sets(a)["target"], all_sets(c)["target"])


def test_control_set_fraction(adata, conditions):
    base = make_ds(adata, conditions)
    ds = make_ds(adata, conditions, control_set_fraction=0.5)
    b = all_sets(ds)
    ctrl = b["cond"].numpy() == -1
    assert ctrl.sum() == round(0.5 * len(base)) and len(ds) == len(base) + ctrl.sum()
    assert (b["pert"][ctrl, 0] == 1).all() and (b["pert"][ctrl, 1:] == 0).all()
    ct, pert = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["perturbation"].astype(str).to_numpy()
    batch = adata.obs["batch"].astype(str).to_numpy()
    vocab = Vocab.build(adata, KEYS, conditions)
    for i in np.flatnonzero(ctrl):
        t, k = rows_of(b["target"][i]), rows_of(b["control"][i])
        assert set(pert[t]) == set(pert[k]) == {"control"}
        assert len(set(zip(ct[t], batch[t]))) == 1 and set(zip(ct[k], batch[k])) == set(zip(ct[t], batch[t]))
        assert b["context"][i, 0] == vocab.contexts[0].index(ct[t[0]])


def test_fallback_logged_once(adata, conditions):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        CellSetIndex.build(adata, KEYS, conditions)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 3  # (Mono, b1), (Mono, b2), (NK, b2)
    assert sum("Mono" in m for m in msgs) == 2 and sum("NK" in m and "b2" in m for m in msgs) == 1
    assert all("same batch" in m for m in msgs)


def test_fallback_without_batch_key(adata, conditions):
    keys = DataKeys("perturbation", "control", ("cell_type",), "log1p")
    index = CellSetIndex.build(adata, keys, conditions)
    mono = next(i for i, c in enumerate(conditions) if c[0] == ("Mono",))
    n_ctrl = int((adata.obs["perturbation"] == "control").sum())
    assert len(index.control_pool(mono)) == n_ctrl  # all control cells
    t = next(i for i, c in enumerate(conditions) if c[0] == ("T",))
    assert set(adata.obs["cell_type"].iloc[index.control_pool(t)]) == {"T"}


def test_fraction_keeps_every_condition(adata, conditions):
    full = CellSetIndex.build(adata, KEYS, conditions)
    part = CellSetIndex.build(adata, KEYS, conditions, fraction=0.2, seed=1)
    for g, h in zip(full.groups, part.groups):
        assert len(h) == max(1, int(np.floor(0.2 * len(g) + 0.5))) and set(h) <= set(g)
    again = CellSetIndex.build(adata, KEYS, conditions, fraction=0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(part.groups, again.groups))
    own = slice(0, full.n_own_pools)
    assert [len(p) for p in part.pools[own]] == [len(p) for p in full.pools[own]]  # controls untouched


def test_set_larger_than_groups(adata, conditions):
    ds = make_ds(adata, conditions, set_size=64)
    assert len(ds) == ds.index.n_units  # one padded set per unit
    b = all_sets(ds)
    key = adata.obs["cell_type"].astype(str) + "|" + adata.obs["batch"].astype(str) + "|"
    key = (key + adata.obs["perturbation"].astype(str)).to_numpy()
    for t, pad in zip(rows_of(b["target"]), b["pad"].numpy()):
        real = t[~pad]
        assert len(set(key[t])) == 1 and len(set(real)) == len(real) == (key == key[t[0]]).sum()
        assert pad.sum() == 64 - len(real)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches(adata, conditions, workers):
    ds = make_ds(adata, conditions, control_set_fraction=0.25)
    loader = make_loader(ds, 4, num_workers=workers)
    first = list(loader)
    assert len(first) == len(loader) == -(-len(ds) // 4)
    b = first[0]
    assert b["target"].shape == (4, S, 12) and b["control"].shape == (4, S, 12) and b["pad"].shape == (4, S)
    assert b["pert"].shape == (4, 1) and b["context"].shape == (4, 1)
    assert b["batch"].shape == b["dose"].shape == b["cond"].shape == (4,)
    assert sum(len(x["cond"]) for x in first) == len(ds)
    second = list(loader)  # next epoch: reshuffled
    assert loader.epoch == 2 and not torch.equal(first[0]["target"], second[0]["target"])


def test_dataset_pickles(adata, conditions):
    ds = make_ds(adata, conditions, control_set_fraction=0.25)
    back = pickle.loads(pickle.dumps(ds))
    assert torch.equal(back[5]["target"], ds[5]["target"]) and torch.equal(back[5]["control"], ds[5]["control"])


def test_loader_ranks_split_the_epoch(adata, conditions):
    ds = make_ds(adata, conditions, control_set_fraction=0.25)
    sets = []
    for rank in (0, 1):
        loader = make_loader(ds, 4, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) and sum(len(b["cond"]) for b in batches) == len(ds) // 2
        sets.append({tuple(rows_of(t).tolist()) for b in batches for t in b["target"]})
    assert not sets[0] & sets[1] and len(sets[0] | sets[1]) == len(ds) // 2 * 2


def test_empty_conditions_give_no_sets(adata):
    ds = make_ds(adata, [], control_set_fraction=0.5)
    assert len(ds) == 0 and ds.index.n_units == 0


def test_mean_de_weight_gives_each_set_its_units_measured_shift_as_gene_weights(adata, conditions):
    alpha = 2.0
    ds = make_ds(adata, conditions, control_set_fraction=0.5, mean_de_weight=alpha)
    b = all_sets(ds)
    w, cond = b["mean_w"].numpy(), b["cond"].numpy()
    assert w.shape == (len(ds), 12) and np.allclose(w.mean(1), 1.0, atol=1e-5)  # every set's weights average 1
    assert (w[cond == -1] == 1).all()  # control->control sets: every gene alike
    ix, X = ds.index, adata.X.toarray() / 10.0  # model space: log1p / scale (10)
    for u in range(ix.n_units):  # by hand: (1 + α·|Δ|/mean|Δ|) / (1 + α), Δ = unit mean − its control pool's mean
        size = np.abs(X[ix.unit_rows[u]].mean(0) - X[ix.pools[ix.unit_pool[u]]].mean(0))
        np.testing.assert_allclose(ds._mean_w[u], (1 + alpha * size / size.mean()) / (1 + alpha), rtol=1e-5)
    sets = ds._cov_row[: len(ds)] < ix.n_units
    np.testing.assert_array_equal(w[sets], ds._mean_w[ds._cov_row[sets]])
    plain = all_sets(make_ds(adata, conditions, control_set_fraction=0.5))  # off: no key, the same sets
    assert "mean_w" not in plain and torch.equal(plain["target"], b["target"])


def test_mean_de_cap_caps_each_genes_share_and_keeps_the_weights_averaging_one(adata, conditions):
    alpha, cap = 2.0, 1.5
    ds = make_ds(adata, conditions, control_set_fraction=0.5, mean_de_weight=alpha, mean_de_cap=cap)
    ix, X = ds.index, adata.X.toarray() / 10.0
    w = ds._mean_w[: ix.n_units]
    np.testing.assert_allclose(w.mean(1), 1.0, rtol=1e-5)
    for u in range(ix.n_units):  # by hand: r = min(|Δ|/mean|Δ|, c), weights (1 + α·r) / (1 + α·mean r)
        size = np.abs(X[ix.unit_rows[u]].mean(0) - X[ix.pools[ix.unit_pool[u]]].mean(0))
        r = np.minimum(size / size.mean(), cap)
        assert (size / size.mean() > cap).any()  # the cap binds on this data, so the check below can fail
        np.testing.assert_allclose(w[u], (1 + alpha * r) / (1 + alpha * r.mean()), rtol=1e-5)
    assert w.max() <= 1 + alpha * cap
    uncapped = make_ds(adata, conditions, control_set_fraction=0.5, mean_de_weight=alpha)._mean_w
    assert uncapped.max() > w.max()  # the cap lowers the largest weight
    big = make_ds(adata, conditions, control_set_fraction=0.5, mean_de_weight=alpha, mean_de_cap=1e9)._mean_w
    np.testing.assert_allclose(big, uncapped, rtol=1e-5)  # a cap nothing reaches changes nothing


def test_mean_de_weight_must_not_be_negative(adata, conditions):
    with pytest.raises(Exception, match="mean_de_weight"):
        make_ds(adata, conditions, mean_de_weight=-1.0)
    with pytest.raises(Exception, match="mean_de_cap"):
        make_ds(adata, conditions, mean_de_weight=1.0, mean_de_cap=-1.0)
