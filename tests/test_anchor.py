"""The anchor (``model.anchor``): each set's control stream shifted by a baseline's leave-one-out shift of its
condition, recorded in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.test_priors import KEYS, _response, program_data

from perturbdiff import CheckpointError, ConfigError, PerturbDiff
from perturbdiff.baselines import make_baseline
from perturbdiff.config import Config
from perturbdiff.data import CellSetDataset, CellSetIndex, Split, Vocab
from perturbdiff.model._anchor import Anchor


def context_split() -> tuple:
    """The program data with g2 and g10 held out in context B only (seen in A): a held-out-context setting."""
    adata, split = program_data(n_per_group=40)
    held = {(("B",), "g2"), (("B",), "g10")}
    return adata, Split(name="ctx", pert_col="perturbation", control="control", context_cols=["cell_type"],
                        train=[c for c in split.train if c not in held], val=[(("B",), "g10")],
                        test=[(("B",), "g2")])


def anchor_config(anchor: str, **extra) -> Config:
    cfg = Config.from_preset("tiny").update({"data": {"set_size": 16, "batch_sets": 8}})
    return cfg.update({"model": {"anchor": anchor}, "diffusion.process": "flow", "sample.steps": 4,
                       "train": {"max_steps": 2, "val_every": 1, "log_every": 1, "warmup_steps": 1}, **extra})


def test_each_condition_gets_the_baselines_shift_without_itself():
    adata, split = context_split()
    additive = Anchor.fit("additive", adata, KEYS, split.train)
    # trained in both contexts: (A, g3) gets B's shift of g3, the shift additive predicts for it unseen
    np.testing.assert_allclose(additive.shift([(("A",), "g3")])[0], _response(adata, (("B",), "g3")), atol=1e-5)
    # held out in B: additive over the training contexts = A's shift; trained only in A: no other context, zero
    np.testing.assert_allclose(additive.shift([(("B",), "g2")])[0], _response(adata, (("A",), "g2")), atol=1e-5)
    assert not additive.shift([(("A",), "g2"), (("A",), "control")]).any()
    # the mean over training perturbations of the context, the condition itself left out
    mean = Anchor.fit("train_mean", adata, KEYS, split.train)
    others = [c for c in split.train if c[0] == ("A",) and c[1] != "g3"]
    np.testing.assert_allclose(mean.shift([(("A",), "g3")])[0], np.mean([_response(adata, c) for c in others], 0),
                               atol=1e-5)
    # an unseen condition's shift is the fitted baseline's own prediction
    fitted = make_baseline("linear").fit(adata, split, KEYS)
    linear = Anchor.fit("linear", adata, KEYS, split.train)
    np.testing.assert_allclose(linear.shift([(("B",), "g2")])[0], fitted.delta(("B",), "g2"), atol=1e-4)


def test_the_knn_mean_anchor_gives_a_part_no_route_places_the_mean_single_shift():
    adata, split = context_split()
    knn, knn_mean = (Anchor.fit(r, adata, KEYS, split.train) for r in ("knn", "knn_mean"))
    singles = [c for c in split.train if c[0] == ("B",) and "+" not in c[1]]
    mean_single = np.mean([_response(adata, c) for c in singles], 0)
    # NOTAGENE was never trained and is in no embedding table: knn takes it as no effect, knn_mean as the mean single
    np.testing.assert_allclose(knn.shift([(("B",), "NOTAGENE")])[0], 0.0)
    np.testing.assert_allclose(knn_mean.shift([(("B",), "NOTAGENE")])[0], mean_single, atol=1e-5)
    # where every part is placed the two routes agree
    np.testing.assert_allclose(knn_mean.shift([(("B",), "g2")]), knn.shift([(("B",), "g2")]), atol=1e-6)


def test_only_the_control_stream_of_perturbed_sets_is_shifted():
    adata, split = context_split()
    index = CellSetIndex.build(adata, KEYS, split.train)
    vocab = Vocab.build(adata, KEYS, split.train)
    rng = np.random.default_rng(0)
    offsets = rng.normal(size=(index.n_units, adata.n_vars)).astype(np.float32)
    kw = {"set_size": 16, "seed": 3, "control_set_fraction": 0.25}
    plain = CellSetDataset(adata, index, vocab, **kw)
    shifted = CellSetDataset(adata, index, vocab, offsets=offsets, **kw)
    items = list(range(len(plain)))
    a, b = plain.__getitems__(items).batched, shifted.__getitems__(items).batched
    torch.testing.assert_close(a["target"], b["target"])
    row = shifted._cov_row[items]
    perturbed = row < index.n_units
    assert perturbed.any() and (~perturbed).any()
    expected = a["control"][perturbed] + torch.from_numpy(offsets[row[perturbed]])[:, None, :]
    torch.testing.assert_close(b["control"][perturbed], expected)
    torch.testing.assert_close(b["control"][~perturbed], a["control"][~perturbed])  # control->control: as they are
    with pytest.raises(Exception, match=r"offsets must be \[units, width\]"):
        CellSetDataset(adata, index, vocab, offsets=offsets[:, :3], **kw)


def test_an_anchored_run_starts_from_the_baseline_and_reloads_its_anchor(tmp_path, capsys):
    adata, split = context_split()
    model = PerturbDiff.from_config(anchor_config("additive"), adata, split)
    assert model.summary["anchor"] == "additive"
    model.train(out_dir=tmp_path, progress=False, device="cpu")
    cond = (("B",), "g2")
    loaded = PerturbDiff.load(tmp_path, adata=adata)
    assert loaded.anchor.route == "additive" and loaded.anchor.conditions == model.anchor.conditions
    np.testing.assert_array_equal(loaded.anchor.shifts, model.anchor.shifts)

    def cells(m):
        return np.asarray(m.predict([cond], n_cells=64, include_controls=False, progress=False, seed=5).X.todense())

    np.testing.assert_array_equal(cells(loaded), cells(model))
    pred = loaded.predict([cond], n_cells=4, include_controls=False, progress=False)
    assert json.loads(pred.uns["perturbdiff"]["run"])["anchor"] == "additive"
    with pytest.raises(CheckpointError, match="holds no matching anchor.shifts tensor"):
        Anchor.from_meta(model.anchor.to_meta(), {}, KEYS, model.genes)
    from perturbdiff.cli import main

    assert main(["info", str(tmp_path)]) == 0
    assert "anchor: every set starts from the additive baseline's shift" in capsys.readouterr().out
    # a network with a zero output layer predicts the control mean (control_skip): the anchor adds its shift
    with torch.no_grad():
        loaded.network.final.linear.weight.zero_()
    anchored = cells(loaded)
    loaded.anchor = None
    plain = cells(loaded)
    delta = make_baseline("additive").fit(adata, split, KEYS).delta(*cond)
    free = (plain > 0).all(0) & (anchored > 0).all(0)  # genes the zero floor and clip leave alone
    assert free.sum() > 20
    np.testing.assert_allclose((anchored - plain)[:, free], np.broadcast_to(delta[free], (64, free.sum())),
                               atol=1e-4)


def test_the_anchor_is_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"model.anchor = 'mean' \(''"):
        Config().update({"model": {"anchor": "mean"}}).validate()
    with pytest.raises(ConfigError, match=r"model.anchor = 'additive' needs codec.kind = 'scale'"):
        Config().update({"model": {"anchor": "additive"}, "codec": {"kind": "latent"}}).validate()


def test_auto_takes_the_baseline_nearest_the_validation_shifts():
    adata, split = context_split()
    anchor, scores = Anchor.choose(adata, KEYS, split)
    assert set(scores) == {"knn", "train_mean", "linear"} and anchor.route == min(scores, key=scores.get)
    # (B, g10) was trained in A: knn (additive there) carries A's shift, the same planted program, far nearer than
    # the mean over every training perturbation of B
    assert anchor.route == "knn" and scores["knn"] < 0.5 * scores["train_mean"]
    no_val = Split(name="noval", pert_col=split.pert_col, control=split.control, context_cols=split.context_cols,
                   train=split.train, val=[], test=split.test)
    fallback, none = Anchor.choose(adata, KEYS, no_val)
    assert fallback.route == "knn" and none == {}
    model = PerturbDiff.from_config(anchor_config("auto"), adata, split)
    assert model.summary["anchor"] == "knn" and model.summary["anchor_scores"] == pytest.approx(scores)
    off = PerturbDiff.from_config(anchor_config(""), adata, split)
    assert off.anchor is None and "anchor" not in off.summary


def test_left_out_parts_take_every_condition_that_holds_them():
    genes = [f"g{i}" for i in range(4)]
    table = {(("A",), "x"): [1.0, 0, 0, 0], (("A",), "y"): [0, 2.0, 0, 0], (("A",), "x+y"): [1.0, 2.0, 3.0, 0],
             (("B",), "x"): [0, 0, 0, 4.0]}
    additive = make_baseline("additive", unseen="zero").fit_shifts(KEYS, genes, table)
    additive.verbose = False
    # the double without itself: the sum of its trained singles; without part x too: y alone
    np.testing.assert_allclose(additive.delta_left_out(("A",), "x+y"), [1.0, 2.0, 0, 0])
    np.testing.assert_allclose(additive.delta_left_out(("A",), "x+y", ("x",)), [0, 2.0, 0, 0])
    # a single without its own part: (B, x) goes too, so x is unseen everywhere: no effect
    np.testing.assert_allclose(additive.delta_left_out(("A",), "x", ("x",)), [0, 0, 0, 0])
    np.testing.assert_allclose(additive.delta_left_out(("A",), "x"), [0, 0, 0, 4.0])  # B's x, as before
    assert not additive.delta_left_out(("A",), "x+y", ("x", "y")).any()  # nothing left: no effect
    assert len(additive.state.train_mean) == 4  # the fitted table is restored
    # linear refits without them: the same as a linear baseline that never saw part x
    adata, split = context_split()
    linear = Anchor.fit("linear", adata, KEYS, split.train)
    kept = Split(name="no-g3", pert_col=split.pert_col, control=split.control, context_cols=split.context_cols,
                 train=[c for c in split.train if c[1] != "g3"], val=[], test=split.test)
    never = make_baseline("linear", unseen="zero").fit(adata, kept, KEYS)
    np.testing.assert_allclose(linear.shift([(("A",), "g3")], without=[("g3",)])[0], never.delta(("A",), "g3"),
                               atol=1e-4)


def test_part_dropout_in_the_data_takes_the_anchor_with_it():
    adata, split = context_split()
    index = CellSetIndex.build(adata, KEYS, split.train)
    vocab = Vocab.build(adata, KEYS, split.train)
    offsets = np.random.default_rng(0).normal(size=(index.n_units, adata.n_vars)).astype(np.float32)

    def part_shift(cond, parts):  # a shift that names the condition and its dropped parts
        assert parts == (cond[1],)
        return np.full(adata.n_vars, 100.0 + vocab.pert.index(cond[1]), np.float32)

    kw = {"set_size": 16, "seed": 3, "control_set_fraction": 0.25, "offsets": offsets}
    plain = CellSetDataset(adata, index, vocab, **kw)
    dropped = CellSetDataset(adata, index, vocab, part_dropout=0.5, part_shift=part_shift, **kw)
    items = list(range(len(plain)))
    a, b = plain.__getitems__(items).batched, dropped.__getitems__(items).batched
    torch.testing.assert_close(a["target"], b["target"])  # the same sets: the dropout is drawn after them
    row = dropped._cov_row[items]
    gone = (b["pert"] == 2).any(1).numpy()
    assert (row[gone] < index.n_units).all()  # control->control sets keep their control label
    assert 0.35 < gone[row < index.n_units].mean() < 0.65
    torch.testing.assert_close(b["pert"][~gone], a["pert"][~gone])
    torch.testing.assert_close(b["control"][~gone], a["control"][~gone])
    names = [vocab.pert[int(p)] for p in a["pert"][gone, 0]]
    shift = torch.tensor([100.0 + vocab.pert.index(n) for n in names])[:, None, None]
    torch.testing.assert_close(b["control"][gone], a["control"][gone] - torch.from_numpy(offsets[row[gone]])[:, None]
                               + shift)
    again = CellSetDataset(adata, index, vocab, part_dropout=0.5, part_shift=part_shift, **kw)
    again.set_epoch(4), dropped.set_epoch(4)
    np.testing.assert_array_equal(again._dropped, dropped._dropped)  # drawn from (seed, epoch): resume is exact


def test_an_anchor_unseen_run_drops_parts_in_the_data_only(tmp_path):
    adata, split = context_split()
    cfg = anchor_config("additive", model={"anchor": "additive", "anchor_unseen": True, "pert_dropout": 0.3})
    model = PerturbDiff.from_config(cfg, adata, split)
    assert model.network.cov_encoder.pert_dropout == 0.0  # the data draws it, with the anchor
    model.train(out_dir=tmp_path, progress=False, device="cpu")
    loaded = PerturbDiff.load(tmp_path, adata=adata)
    assert loaded.cfg.model.anchor_unseen and loaded.network.cov_encoder.pert_dropout == 0.0
    assert loaded.network.cov_encoder.combo_dropout == 0.0  # combinations' parts too
    with pytest.raises(ConfigError, match=r"model.anchor_unseen = true needs an anchor"):
        Config().update({"model": {"anchor": "", "anchor_unseen": True}}).validate()
    with pytest.raises(ConfigError, match=r"model.pert_dropout_combo needs model.anchor_unseen = false"):
        Config().update({"model": {"anchor": "additive", "anchor_unseen": True, "pert_dropout_combo": 0.3}}).validate()
    with pytest.raises(ConfigError, match=r"model.pert_dropout_combo = -0.5 \(in \[0, 1\], or -1"):
        Config().update({"model": {"pert_dropout_combo": -0.5}}).validate()
