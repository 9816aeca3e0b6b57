"""Marginal pretraining, finetuning (three input/output-layer strategies) and zero-shot prediction (SPEC §5)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from perturbdiff import CheckpointError, ConfigError, DataError, PerturbDiff, Pretrained, finetune
from perturbdiff.cli import main
from perturbdiff.config import Config
from perturbdiff.data import MarginalSetDataset, gene_masks, gene_vocabulary, make_split, marginal_source
from perturbdiff.datasets import simulate_atlas
from perturbdiff.diffusion import VPDiffusion

TINY = {"model.hidden": 16, "model.depth": 1, "model.heads": 2, "model.cov_dim": 8, "data.set_size": 8,
        "data.batch_sets": 4, "train.val_every": 1000, "train.log_every": 1, "train.warmup_steps": 1,
        "sample.steps": 4, "sample.start": "full"}


def tiny_cfg(**extra) -> Config:
    return Config.from_preset("tiny").update({**TINY, **extra})


@pytest.fixture(scope="module")
def atlas():
    """Plain counts without perturbations; gene names partly shared with the task (G0001 ...)."""
    return simulate_atlas(300, 140, n_cell_types=3, n_batches=2, seed=5)


@pytest.fixture(scope="module")
def sources(synthetic_prep, atlas):
    task = marginal_source(synthetic_prep, "task")
    plain = marginal_source(atlas, "atlas", context_keys=["cell_type"], input_kind="counts", n_hvg=60)
    return [task, plain]


@pytest.fixture(scope="module")
def pretrained(sources):
    pre = Pretrained.from_sources(tiny_cfg(), sources)
    return pre.train(sources, max_steps=3, progress=False, device="cpu")


@pytest.fixture(scope="module")
def split(synthetic_prep, synthetic_keys):
    return make_split(synthetic_prep, synthetic_keys, "held-out-contexts-partial", holdout="CT1", seed=0)


def test_gene_vocabulary_is_the_union_in_order_and_masks_mark_measured_genes():
    lists = [["a", "b", "d"], ["b", "c"], ["e"]]
    vocab = gene_vocabulary(lists)
    assert vocab == ["a", "b", "d", "c", "e"]
    masks = gene_masks(lists, vocab)
    assert masks.tolist() == [[1, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_sources_take_control_cells_of_a_task_and_all_cells_of_an_atlas(sources, synthetic_prep, atlas):
    task, plain = sources
    is_ctrl = synthetic_prep.obs["perturbation"].astype(str).to_numpy() == "control"
    assert np.array_equal(task.rows, np.flatnonzero(is_ctrl)) and task.cells == "control cells"
    assert len(plain.rows) == atlas.n_obs and plain.cells == "all cells" and len(plain.genes) == 60
    every = marginal_source(synthetic_prep, "task", all_cells=True)
    assert np.array_equal(every.rows, np.arange(synthetic_prep.n_obs)) and every.cells == "all cells"
    assert set(plain.contexts.tolist()) == set(atlas.obs["cell_type"].astype(str))


def test_marginal_batches_are_zero_filled_on_absent_genes_and_hold_the_right_cells(sources):
    vocab = gene_vocabulary([s.genes for s in sources])
    tokens = ["<unknown>", *sorted(set().union(*(set(s.contexts.tolist()) for s in sources)))]
    ds = MarginalSetDataset(sources, vocab, tokens, set_size=8, seed=0)
    b = ds.__getitems__(list(range(len(ds)))).batched
    masks = torch.from_numpy(gene_masks([s.genes for s in sources], vocab)).float()
    assert torch.equal(b["gene_mask"], masks[b["dataset"]])
    assert float((b["target"] * (1 - b["gene_mask"])[:, None]).abs().sum()) == 0.0  # absent genes are zero
    assert float(b["control"].abs().sum()) == 0.0 and int(b["pert"].abs().sum()) == 0
    # every set: cells of one data set and one context, values = that data set's log1p / scale
    rows, units = ds._rows, ds._unit
    for i in (0, len(ds) // 2, len(ds) - 1):
        d = int(b["dataset"][i])
        src = sources[d]
        local = ds._local[rows[i]]
        assert len(set(src.contexts[local].tolist())) == 1
        assert tokens[int(b["context"][i, 0])] == src.contexts[local[0]]
        cols = np.asarray([vocab.index(g) for g in src.genes])
        want = src.adata.X[src.rows[local]].toarray() / 10.0
        np.testing.assert_allclose(b["target"][i][:, cols].numpy(), want, rtol=1e-6)
    assert len(set(units.tolist())) == len(ds._sizes)  # every (data set, context) unit appears in an epoch


def test_masked_loss_ignores_absent_genes():
    """Changing prediction and target on masked-out genes leaves the loss (MSE, ED, set mean) unchanged."""
    B, S, G = 3, 6, 10
    mask = torch.ones(B, G)
    mask[:, 7:] = 0.0
    target = torch.rand(B, S, G)
    fixed = torch.rand(B, S, G)

    class Const(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out, self.w = out, torch.nn.Parameter(torch.ones(()))

        def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None):
            return self.out * self.w

    def loss(pred, tgt):
        batch = {"target": tgt, "control": torch.zeros(B, S, G), "gene_mask": mask,
                 "pert": torch.zeros(B, 1, dtype=torch.long), "context": torch.zeros(B, 1, dtype=torch.long),
                 "batch": torch.zeros(B, dtype=torch.long), "dose": torch.zeros(B, dtype=torch.long)}
        cfg = Config().update({"diffusion.timesteps": 100}).diffusion
        return VPDiffusion(cfg).loss(Const(pred), batch, torch.Generator().manual_seed(0))[1]

    base = loss(fixed, target)
    other_pred, other_target = fixed.clone(), target.clone()
    other_pred[..., 7:] += 5.0
    other_target[..., 7:] = 0.0
    moved = loss(other_pred, other_target)
    for k in ("mse", "ed", "mean", "loss"):
        assert moved[k] == pytest.approx(base[k], rel=1e-5), k
    inside = fixed.clone()
    inside[..., 0] += 1.0
    assert loss(inside, target)["mse"] > base["mse"]  # a measured gene does count


def test_pretrained_network_has_one_io_layer_per_data_set(pretrained, sources):
    V = len(pretrained.genes)
    assert pretrained.network.x_in.weight.shape == (2, 16, 2 * V)
    assert pretrained.network.final.linear.weight.shape == (2, V, 16)
    assert pretrained.cfg.diffusion.p_drop_control == 1.0
    assert pretrained.trainer.state.step == 3


@pytest.mark.parametrize("io_layers", ["keep", "reinit", "task"])
def test_io_layer_choices_change_exactly_their_parameters(pretrained, synthetic_prep, split, io_layers):
    cfg = tiny_cfg()
    fresh = PerturbDiff.from_config(cfg, synthetic_prep, split).network.state_dict()
    model = finetune(pretrained, cfg, synthetic_prep, split, io_layers=io_layers, dataset="task")
    net, pre = model.network.state_dict(), pretrained.network.state_dict()
    for name in net:  # trunk: the pretrained weights
        if name.startswith(("blocks.", "t_embed.")):
            assert torch.equal(net[name], pre[name]), name
    assert not torch.equal(pre["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])  # test can fail
    for name in ("cov_encoder.pert.weight", "cov_encoder.batch.weight", "final.adaLN_modulation.1.weight"):
        assert torch.equal(net[name], fresh[name]), name  # perturbation encoder and final modulation: fresh
    pos = [pretrained.genes.index(g) for g in model.genes]
    V, G = len(pretrained.genes), len(model.genes)
    pre_x = pre["x_in.weight"][0]  # data set "task"
    keep_x = torch.cat([pre_x[:, pos], pre_x[:, [V + p for p in pos]]], dim=1)
    keep_out = pre["final.linear.weight"][0][pos]
    if io_layers == "keep":
        assert torch.equal(net["x_in.weight"], keep_x)
        assert torch.equal(net["final.linear.weight"], keep_out)
    elif io_layers == "reinit":
        assert not torch.equal(net["x_in.weight"], keep_x) and not torch.equal(net["x_in.weight"], fresh["x_in.weight"])
        bound = (6.0 / (2 * V + 16)) ** 0.5  # xavier bound of a vocabulary-wide layer, not of a G-gene one
        assert float(net["x_in.weight"].abs().max()) <= bound
        assert float(net["x_in.weight"].abs().max()) > 0.8 * bound
    else:
        assert torch.equal(net["x_in.weight"], fresh["x_in.weight"])
        assert torch.equal(net["final.linear.weight"], fresh["final.linear.weight"])
    assert net["x_in.weight"].shape == (16, 2 * G)


def test_a_marginal_is_never_guided(pretrained, synthetic_prep, split):
    """Pretraining pins sample.guidance to 0 whatever the preset says, and zero-shot samples without guidance even
    where a run's config records a weight: a marginal has no perturbation to lean towards or away from."""
    from perturbdiff.model import pretrain_config

    assert pretrain_config(tiny_cfg().update({"sample.guidance": -0.5})).sample.guidance == 0.0
    own = pretrained.cfg.sample.guidance
    kw = dict(split=split, n_cells=8, include_controls=False, progress=False, seed=1)
    plain = pretrained.zero_shot(synthetic_prep, **kw).X.toarray()
    try:
        pretrained.cfg.sample.guidance = -0.5
        weighted = pretrained.zero_shot(synthetic_prep, **kw).X.toarray()
    finally:
        pretrained.cfg.sample.guidance = own
    np.testing.assert_array_equal(weighted, plain)


def test_pretrain_finetune_predict_and_zero_shot_end_to_end(tmp_path, synthetic_prep, atlas, split):
    task, plain, sp_path = tmp_path / "task.h5ad", tmp_path / "atlas.h5ad", tmp_path / "split.json"
    synthetic_prep.write_h5ad(task)
    atlas.write_h5ad(plain)
    split.write(sp_path)
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    pre_run, ft_run = tmp_path / "pre", tmp_path / "ft"
    assert main(["pretrain", str(task), str(plain), "--context-keys", "atlas=cell_type", "--input-kind", "counts",
                 "--n-hvg", "60", "--preset", "tiny", *sets, "--max-steps", "2", "--no-progress",
                 "--out", str(pre_run)]) == 0
    assert main(["info", str(pre_run)]) == 0
    assert main(["finetune", str(pre_run), str(task), "--split", str(sp_path), "--io-layers", "reinit",
                 "--fraction", "0.5", *sets, "--max-steps", "2", "--no-progress", "--out", str(ft_run)]) == 0
    assert "fraction = 0.5" in (ft_run / "config.toml").read_text()
    model = PerturbDiff.load(ft_run)
    assert model.summary["pretrained"]["io_layers"] == "reinit"
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(ft_run), "--data", str(task), "--n-cells", "8", "--no-progress",
                 "--out", str(out)]) == 0
    zs = tmp_path / "zero.h5ad"
    assert main(["predict", str(pre_run), "--data", str(task), "--split", str(sp_path), "--n-cells", "8",
                 "--no-progress", "--out", str(zs)]) == 0
    pred = ad.read_h5ad(zs)
    got = pred[pred.obs["predicted"].to_numpy(bool)]
    assert list(pred.var_names) == list(synthetic_prep.var_names)
    assert got.n_obs == 8 * len(split.test)
    assert np.isfinite(got.X.toarray()).all() and got.X.max() > 0
    assert set(got.obs["perturbation"].astype(str)) == {p for _, p in split.test}


def test_errors_name_the_problem(tmp_path, pretrained, atlas, synthetic_prep, split):
    with pytest.raises(DataError, match="atlas"):
        marginal_source(atlas, "atlas")  # no record, no context columns
    with pytest.raises(DataError, match="tissue"):
        marginal_source(atlas, "atlas", context_keys=["tissue"], input_kind="counts")
    with pytest.raises(ConfigError, match="io_layers"):
        finetune(pretrained, tiny_cfg(), synthetic_prep, split, io_layers="all")
    with pytest.raises(DataError, match="nope"):
        finetune(pretrained, tiny_cfg(), synthetic_prep, split, dataset="nope")
    path = pretrained.save(tmp_path / "pre.safetensors")
    with pytest.raises(CheckpointError, match="pretraining run"):
        PerturbDiff.load(path)
    assert Pretrained.load(path).genes == pretrained.genes


def test_pretraining_streams_from_a_store_with_the_same_cells(tmp_path, synthetic_prep, atlas):
    """A preprocessed store is a pretraining source like its in-memory AnnData: same targets, rows read lazily."""
    from perturbdiff.data import StoreMatrix, open_store, write_store

    write_store(synthetic_prep, tmp_path / "cells")
    store = open_store(tmp_path / "cells")
    assert isinstance(store.X, StoreMatrix)
    lazy, mem = marginal_source(store, "task"), marginal_source(synthetic_prep, "task")
    assert lazy.genes == mem.genes and len(lazy.rows) == len(mem.rows)
    kw = {"set_size": 8, "seed": 3}
    tokens = ["<unknown>", *sorted(set(mem.contexts.tolist()))]
    a = MarginalSetDataset([lazy], lazy.genes, tokens, **kw).__getitems__(list(range(6))).batched
    b = MarginalSetDataset([mem], mem.genes, tokens, **kw).__getitems__(list(range(6))).batched
    # the store sorts cells by condition: compare the sets' cells as multisets of rows (sorted by their sums)
    for i in range(6):
        assert a["context"][i] == b["context"][i]
        ka = a["target"][i][a["target"][i].sum(1).argsort()]
        kb = b["target"][i][b["target"][i].sum(1).argsort()]
        assert torch.allclose(ka, kb)


def test_an_atlas_preprocessed_into_a_store_pretrains_from_disk(tmp_path, synthetic_prep, atlas):
    """preprocess without --pert-key (atlas: every cell a control) --store, then pretrain reads the store."""
    raw, store, task = tmp_path / "atlas.h5ad", tmp_path / "atlas.store", tmp_path / "task.h5ad"
    atlas.write_h5ad(raw)
    synthetic_prep.write_h5ad(task)
    assert main(["preprocess", str(raw), "--context-keys", "cell_type", "--input-kind", "counts", "--n-hvg", "50",
                 "--store", str(store)]) == 0
    assert main(["preprocess", str(raw), "--pert-key", "batch", "--context-keys", "cell_type", "--input-kind",
                 "counts", "--store", str(tmp_path / "x")]) == 2  # --pert-key without --control-value
    from perturbdiff.datasets import read_h5ad

    src = marginal_source(read_h5ad(store), "atlas")
    assert src.cells == "all cells" and len(src.rows) == atlas.n_obs and len(src.genes) == 50
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    run = tmp_path / "pre"
    assert main(["pretrain", str(task), str(store), "--names", "task,atlas", "--preset", "tiny", *sets,
                 "--max-steps", "2", "--no-progress", "--out", str(run)]) == 0
    pre = Pretrained.load(run)
    assert [d["name"] for d in pre.datasets] == ["task", "atlas"] and pre.datasets[1]["n_cells"] == atlas.n_obs
