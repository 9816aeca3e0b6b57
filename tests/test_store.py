"""The out-of-core cell store: round trip, group index, identical set batches, training / prediction from a store,
``preprocess --store`` through the CLI, atomic writes and clear errors."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pytest
import torch

import perturbdiff.data._store as store_mod
import perturbdiff.data._store_write as store_write_mod
from perturbdiff import Config, DataError, PerturbDiff
from perturbdiff.cli import main
from perturbdiff.data import (
    CellSetDataset,
    CellSetIndex,
    CellStore,
    StoreMatrix,
    Vocab,
    get_record,
    make_split,
    nonzero_stats,
    open_store,
    preprocess,
    row_mean,
    training_mask,
    write_store,
)
from perturbdiff.datasets import read_h5ad


@pytest.fixture(scope="module")
def store(synthetic_prep, tmp_path_factory) -> CellStore:
    return write_store(synthetic_prep, tmp_path_factory.mktemp("store") / "cells")


def _orig(store: CellStore, prep) -> np.ndarray:
    """Row of the in-memory AnnData holding each store row."""
    return prep.obs_names.get_indexer(store.obs_names)


def test_rows_round_trip(store, synthetic_prep):
    orig, X = _orig(store, synthetic_prep), synthetic_prep.X
    assert isinstance(store.X, StoreMatrix) and store.shape == synthetic_prep.shape and (orig >= 0).all()
    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, store.n_obs, 300), rng.permutation(store.n_obs)[:50], np.array([5, 5, 0, -1])):
        got = store.X[rows]
        assert got.dtype == np.float32 and got.shape == (len(rows), store.n_vars)
        np.testing.assert_array_equal(got.toarray(), X[orig[rows]].toarray())
    mask = rng.random(store.n_obs) < 0.3
    np.testing.assert_array_equal(store.X[mask].toarray(), X[orig[mask]].toarray())
    np.testing.assert_array_equal(store.X[40:90, :].toarray(), X[orig[40:90]].toarray())
    assert store.X[np.zeros(0, np.int64)].shape == (0, store.n_vars)
    again = pickle.loads(pickle.dumps(store.X))  # what a spawned DataLoader worker receives
    np.testing.assert_array_equal(again[rows].toarray(), X[orig[rows]].toarray())
    for prefetch in (True, False):  # announced pages or not: the same rows
        store.X.prefetch = prefetch
        np.testing.assert_array_equal(store.X[rows].toarray(), X[orig[rows]].toarray())
    store.X.prefetch = None
    with pytest.raises(IndexError):
        store.X[[store.n_obs]]
    sub = store[mask, list(store.var_names[:7])]  # an in-memory AnnData, as AnnData indexing gives
    np.testing.assert_array_equal(sub.X.toarray(), X[orig[mask]][:, :7].toarray())
    assert list(sub.obs_names) == list(store.obs_names[mask])
    plain = ad.read_h5ad(store.path / "cells.h5ad")  # the store's cells are a valid .h5ad
    np.testing.assert_array_equal(plain.X.toarray(), X[orig].toarray())
    assert get_record(plain) == get_record(synthetic_prep)


def test_group_index_is_contiguous_stable_and_labelled(store, synthetic_prep, synthetic_keys):
    g = store.groups
    assert g["start"].iloc[0] == 0 and g["end"].iloc[-1] == store.n_obs
    assert (g["start"].to_numpy()[1:] == g["end"].to_numpy()[:-1]).all() and (g["end"] > g["start"]).all()
    cols = ["cell_type", "perturbation"]
    assert len(g) == len(synthetic_prep.obs.groupby(cols, observed=True))
    orig = _orig(store, synthetic_prep)
    for _, row in g.iterrows():
        obs = store.obs.iloc[row["start"] : row["end"]]
        for c in cols:
            assert (obs[c].astype(str) == row[c]).all(), (c, row)
        assert (np.diff(orig[row["start"] : row["end"]]) > 0).all()  # original order kept within a group
    assert json.loads((store.path / "store.json").read_text())["n_obs"] == store.n_obs


def test_set_batches_from_store_equal_in_memory(store, synthetic_prep, synthetic_keys):
    """A stable sort by condition keeps every unit's and pool's cell order: the same seed draws the same cells."""
    conds = sorted({((c,), p) for c, p in zip(synthetic_prep.obs["cell_type"], synthetic_prep.obs["perturbation"])
                    if p != "control"})
    vocab = Vocab.build(synthetic_prep, synthetic_keys, conds)
    sets = []
    for data in (synthetic_prep, store):
        index = CellSetIndex.build(data, synthetic_keys, conds, fraction=0.7, seed=1)
        sets.append(CellSetDataset(data, index, vocab, set_size=8, seed=3, control_set_fraction=0.25))
    assert isinstance(sets[1].X, StoreMatrix) and len(sets[0]) == len(sets[1])
    for epoch in (0, 1):
        for ds in sets:
            ds.set_epoch(epoch)
        for i in range(0, len(sets[0]), 16):
            idx = list(range(i, min(i + 16, len(sets[0]))))
            a, b = (ds.__getitems__(idx).batched for ds in sets)
            for k in a:
                assert torch.equal(a[k], b[k]), (epoch, i, k)


def test_training_statistics_exact_in_blocks(store, synthetic_prep, monkeypatch):
    monkeypatch.setattr(store_mod, "_BLOCK", 60)  # many blocks: exercises the bounded order-statistics buffer
    orig = _orig(store, synthetic_prep)
    rows = np.random.default_rng(2).choice(store.n_obs, 400, replace=False)
    for q in (0.0, 0.01, 0.5, 1.0):
        assert nonzero_stats(store.X, rows, q) == nonzero_stats(synthetic_prep.X, orig[rows], q)
    np.testing.assert_allclose(row_mean(store.X, rows), row_mean(synthetic_prep.X, orig[rows]), rtol=1e-5)


def test_prefetch_page_runs_cover_exactly_the_rows_pages():
    from perturbdiff.data._store import _PAGE, _Flat

    rng = np.random.default_rng(3)
    for offset in (0, 100, 4095):
        flat = _Flat("unused", offset, "<f4", 10**6)
        lo = rng.integers(0, 20_000, 40)
        hi = lo + rng.integers(0, 3_000, 40) * (rng.random(40) < 0.8)  # some empty rows: no page
        starts, lengths = flat._pages(lo, hi)
        got = {q for a, n in zip(starts, lengths) for q in range(a // _PAGE, (a + n) // _PAGE)}
        want = {q for a, b in zip(lo, hi) if b > a
                for q in range((offset + 4 * a) // _PAGE, -(-(offset + 4 * b) // _PAGE))}
        assert got == want
        assert all(a + n < b for a, n, b in zip(starts, lengths, starts[1:]))  # merged, sorted, disjoint runs


def _tiny() -> Config:
    return Config.from_preset("tiny").update({
        "data": {"set_size": 8, "batch_sets": 4},
        "sample": {"start": "full", "steps": 2},
        "train": {"max_steps": 3, "val_every": 3, "warmup_steps": 1, "val_max_conditions": 2, "log_every": 1}})


def test_train_and_predict_from_store(store, synthetic_prep, synthetic_keys):
    split = make_split(synthetic_prep, synthetic_keys, "held-out-contexts-partial", seed=0)
    models = []
    for data in (synthetic_prep, store):  # from_config seeds torch: each run starts from the same global RNG state
        models.append(PerturbDiff.from_config(_tiny(), data, split).train(progress=False, device="cpu"))
    assert models[0].codec == models[1].codec  # the same bounds and zero level, the store's read in chunks
    for (k, a), b in zip(models[0].network.state_dict().items(), models[1].network.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # same cells in the same sets: the same training run
    preds = [m.predict(n_cells=5, progress=False, device="cpu") for m in models]
    assert int(preds[1].obs["predicted"].sum()) == 5 * len(split.test)
    np.testing.assert_array_equal(preds[0].X.toarray(), preds[1].X.toarray())  # same control cells drawn
    assert (~preds[1].obs["predicted"].to_numpy(bool)).sum() > 0


def _cli_args(src, *extra: str) -> list[str]:
    return ["preprocess", str(src), "--pert-key", "perturbation", "--control-value", "control", "--context-keys",
            "cell_type", "--batch-key", "batch", "--input-kind", "counts", *extra]


@pytest.fixture(scope="module")
def counts_file(synthetic_counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("counts") / "counts.h5ad"
    synthetic_counts.write_h5ad(path)
    return path


def test_cli_preprocess_store_matches_in_memory(counts_file, synthetic_counts, synthetic_keys, tmp_path, capsys):
    split = make_split(synthetic_counts, synthetic_keys, "held-out-perturbations", seed=1)
    split.var_names = None  # HVGs of the split's training cells
    split.write(tmp_path / "split.json")
    out = tmp_path / "st"
    assert main(_cli_args(counts_file, "--n-hvg", "50", "--split", str(tmp_path / "split.json"), "--store",
                          str(out), "--chunk-cells", "97")) == 0
    assert f"wrote {out}: 600 cells x 50 genes" in capsys.readouterr().out
    st = read_h5ad(out)  # a store directory opens lazily wherever an .h5ad is read
    assert isinstance(st, CellStore)
    ref = preprocess(synthetic_counts, synthetic_keys, n_hvg=50,
                     train_mask=training_mask(synthetic_counts, synthetic_keys, split))
    assert list(st.var_names) == list(ref.var_names)  # chunked seurat HVGs == scanpy's
    sel = get_record(st)["gene_selection"]
    assert sel["moments"] == "chunked" and sel["n_train_cells"] == get_record(ref)["gene_selection"]["n_train_cells"]
    np.testing.assert_allclose(st.X[:].toarray(), ref.X[_orig(st, ref)].toarray(), rtol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_out_and_store_then_train_and_predict(counts_file, synthetic_counts, synthetic_keys, tmp_path):
    out, st = tmp_path / "prep.h5ad", tmp_path / "st"
    assert main(_cli_args(counts_file, "--n-hvg", "40", "--out", str(out), "--store", str(st))) == 0
    prep = ad.read_h5ad(out)
    np.testing.assert_array_equal(open_store(st).X[:].toarray(), prep.X[_orig(open_store(st), prep)].toarray())
    make_split(prep, synthetic_keys, "held-out-contexts-partial", seed=0).write(tmp_path / "split.json")
    run = tmp_path / "run"
    assert main(["train", str(st), "--split", str(tmp_path / "split.json"), "--preset", "tiny", "--max-steps", "2",
                 "--set", "data.set_size=8", "--set", "train.val_max_conditions=1", "--set",
                 "sample.start='full'", "--set", "sample.steps=2", "--device", "cpu",
                 "--no-progress", "--out", str(run)]) == 0
    assert main(["predict", str(run), "--data", str(st), "--n-cells", "3", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "pred.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "pred.h5ad").obs["predicted"].sum() > 0


def test_failed_write_leaves_no_half_store(synthetic_prep, tmp_path, monkeypatch):
    target = tmp_path / "st"
    real = store_write_mod._write_h5

    def dies_midway(file, obs, var, uns, blocks, nnz):
        def some_blocks():
            yield next(iter(blocks))
            raise OSError("disk full")

        real(file, obs, var, uns, some_blocks(), nnz)

    monkeypatch.setattr(store_write_mod, "_write_h5", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        write_store(synthetic_prep, target)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary directory
    monkeypatch.setattr(store_write_mod, "_write_h5", real)
    first = write_store(synthetic_prep, target)
    monkeypatch.setattr(store_write_mod, "_write_h5", dies_midway)
    with pytest.raises(OSError):
        write_store(synthetic_prep, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]  # the old store is untouched and still opens
    np.testing.assert_array_equal(open_store(target).X[:].toarray(), first.X[:].toarray())


def test_not_a_store_is_a_clear_error(synthetic_prep, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    for call in (open_store, read_h5ad):
        with pytest.raises(DataError, match="store.json") as e:
            call(plain)
        assert str(plain) in str(e.value)
    with pytest.raises(DataError, match="refusing to replace") as e:
        write_store(synthetic_prep, plain)
    assert str(plain) in str(e.value) and (plain / "notes.txt").read_text() == "mine"
    (plain / "store.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="format"):
        open_store(plain)
    with pytest.raises(DataError, match="not found"):
        open_store(tmp_path / "missing")
