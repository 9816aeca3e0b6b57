"""Training: LR schedule, learning on a planted effect, exact resume, safe and atomic checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import perturbdiff.train._checkpoint as ckpt
from perturbdiff import CheckpointError, Config, ConfigError, DataError, PerturbDiff
from perturbdiff.data import DataKeys, Split, preprocess
from perturbdiff.train import Trainer, load_checkpoint, lr_factor

SHIFTED = np.arange(8)  # genes the perturbation "UP" raises


def planted_data(n_per_group: int = 96, n_genes: int = 40, seed: int = 0) -> tuple[AnnData, Split]:
    """Three contexts; perturbation UP adds +2 (log1p) to genes 0-7; DOWN silences genes 8-15."""
    rng = np.random.default_rng(seed)
    groups = [(ctx, p) for ctx in ("A", "B", "C") for p in ("control", "UP", "DOWN")]
    blocks, obs = [], []
    for ctx, p in groups:
        base = rng.gamma(2.0, 0.5, size=(n_per_group, n_genes)) * (rng.random((n_per_group, n_genes)) < 0.5)
        base += {"A": 0.0, "B": 0.5, "C": 0.25}[ctx]
        if p == "UP":
            base[:, SHIFTED] += 2.0
        if p == "DOWN":
            base[:, 8:16] = 0.0
        blocks.append(base)
        obs += [(ctx, p)] * n_per_group
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs_df = pd.DataFrame(obs, columns=["cell_type", "perturbation"]).astype("category")
    obs_df.index = obs_df.index.astype(str)
    adata = AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    keys = DataKeys("perturbation", "control", ("cell_type",), "log1p")
    prep = preprocess(adata, keys, var_names=list(adata.var_names))
    split = Split(name="planted", pert_col="perturbation", control="control", context_cols=["cell_type"],
                  train=[(("A",), "UP"), (("B",), "UP"), (("A",), "DOWN"), (("C",), "UP")], val=[(("C",), "DOWN")],
                  test=[(("B",), "DOWN")])
    return prep, split


def tiny_config(**train) -> Config:
    cfg = Config.from_preset("tiny").update({"data": {"set_size": 16, "batch_sets": 8}})
    return cfg.update({"train": {"max_steps": 200, "val_every": 100, "log_every": 10, "warmup_steps": 20, **train}})


def test_lr_schedule_warmup_plateau_cosine():
    cfg = tiny_config(max_steps=1000, warmup_steps=100, plateau_fraction=0.5, min_lr_ratio=0.1).train
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(400, cfg) == pytest.approx(1.0)  # plateau: 100 .. 550
    assert 0.1 < lr_factor(800, cfg) < 1.0
    assert lr_factor(999, cfg) == pytest.approx(0.1, abs=1e-3)


def _pseudobulk_error(model: PerturbDiff, adata: AnnData, cond) -> float:
    pred = model.predict([cond], n_cells=64, include_controls=False, progress=False)
    real = adata[(adata.obs["cell_type"] == cond[0][0]).to_numpy() & (adata.obs["perturbation"] == cond[1]).to_numpy()]
    return float(np.mean((pred.X.toarray().mean(0) - real.X.toarray().mean(0)) ** 2))


def test_training_lowers_loss_and_moves_samples_toward_the_condition(tmp_path):
    adata, split = planted_data()
    model = PerturbDiff.from_config(tiny_config(), adata, split)
    cond = (("B",), "UP")
    before = _pseudobulk_error(model, adata, cond)
    model.train(out_dir=tmp_path, progress=False)
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["loss"].iloc[-3:].mean() < 0.7 * log["loss"].iloc[:2].mean()
    after = _pseudobulk_error(model, adata, cond)
    assert after < 0.3 * before, (before, after)
    pred = model.predict([cond], n_cells=64, include_controls=False, progress=False).X.toarray().mean(0)
    ctrl = adata[(adata.obs["cell_type"] == "B").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    shift = pred - ctrl.X.toarray().mean(0)
    assert shift[SHIFTED].mean() > 1.0 > abs(np.delete(shift, SHIFTED).mean())


def _interrupt_at(monkeypatch, step: int) -> None:
    """Make training stop with Ctrl-C once ``step`` steps are done (the loop saves ``last`` on the way out)."""
    real = Trainer.train_step

    def train_step(self, batches):
        if self.state.step == step:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_resume_gives_the_same_next_steps_as_an_unbroken_run(tmp_path, monkeypatch):
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=6, val_every=2, log_every=1)
    full = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.safetensors")[1]["state"]["step"] == 3
    resumed = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "b", progress=False)
    assert list(pd.read_csv(tmp_path / "b" / "log.csv")["step"]) == [1, 2, 3, 4, 5, 6]
    assert_same_run(tmp_path / "a", tmp_path / "b", full, resumed)


def assert_same_run(a, b, full: PerturbDiff, resumed: PerturbDiff) -> None:
    """Run folder ``b`` (interrupted, resumed) logged the same steps and losses as ``a`` (unbroken), and ends with
    the same weights."""
    la, lb = pd.read_csv(a / "log.csv"), pd.read_csv(b / "log.csv")
    assert list(lb["step"]) == list(la["step"])
    np.testing.assert_array_equal(la["loss"].to_numpy(), lb["loss"].to_numpy())
    for (k, v), w in zip(full.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(v, w), k


def test_checkpoint_round_trip_and_prediction_is_deterministic(tmp_path):
    adata, split = planted_data(n_per_group=40)
    model = PerturbDiff.from_config(tiny_config(max_steps=4, val_every=2), adata, split)
    model.train(out_dir=tmp_path, progress=False)
    loaded = PerturbDiff.load(tmp_path, adata=adata, which="last")
    a = model.predict(progress=False, seed=3)
    b = loaded.predict(progress=False, seed=3)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert loaded.vocab.to_dict() == model.vocab.to_dict()
    assert loaded.genes == list(adata.var_names)


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "best.safetensors"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        PerturbDiff.load(tmp_path)
    path.write_bytes(b"\x80\x04K\x01.")  # a bare pickle stream
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_a_safetensors_header_length_ending_in_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """A safetensors file starts with its header length; a low byte of 0x80 is also the pickle magic."""
    path = tmp_path / "c.safetensors"
    for pad in range(300):
        ckpt.save_checkpoint(path, {"w": torch.ones(4)}, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    tensors, meta = load_checkpoint(path)
    assert meta["pad"] == "x" * pad and torch.equal(tensors["w"], torch.ones(4))


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(4)}, {"step": 1})

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"w": torch.zeros(4)}, {"step": 2})
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind


def test_prediction_layout(tmp_path):
    adata, split = planted_data(n_per_group=40)
    model = PerturbDiff.from_config(tiny_config(max_steps=2, val_every=2), adata, split)
    model.train(progress=False)
    pred = model.predict([(("A",), "UP"), (("B",), "UP")], n_cells=[10, 23], n_samples=2, progress=False)
    p = pred.obs[pred.obs["predicted"]]
    assert p.groupby(["cell_type", "perturbation", "sample"], observed=True).size().to_dict() == {
        ("A", "UP", 0): 10, ("A", "UP", 1): 10, ("B", "UP", 0): 23, ("B", "UP", 1): 23}
    ctrl = pred.obs[~pred.obs["predicted"]]
    assert set(ctrl["perturbation"]) == {"control"} and len(ctrl) == 80  # both contexts' controls
    assert list(pred.var_names) == list(adata.var_names)
    assert pred.uns["perturbdiff"]["scale"] == "log1p"
    assert pred.X.min() >= 0


def test_external_embedding_table_makes_an_unseen_perturbation_representable(tmp_path):
    adata, split = planted_data(n_per_group=40)
    table = pd.DataFrame(np.eye(4, dtype=np.float32), index=["UP", "DOWN", "NEW", "OTHER"])
    table.to_csv(tmp_path / "emb.tsv", sep="\t")
    cfg = tiny_config(max_steps=2, val_every=2).update({"model": {"pert_embedding": str(tmp_path / "emb.tsv")}})
    model = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "run", progress=False)
    pred = model.predict([(("A",), "NEW+UP")], n_cells=5, include_controls=False, progress=False)
    assert pred.n_obs == 5
    loaded = PerturbDiff.load(tmp_path / "run", adata=adata)
    assert "NEW" in loaded.info()["representable"] and "NEW" not in loaded.info()["perturbations"]
    with pytest.raises(DataError, match=r"A/MISSING hold .*: MISSING"):
        loaded.predict([(("A",), "MISSING")], n_cells=5, progress=False)


# -- regression tests of the correctness review (issue 11) ---------------------------------------------------------
def test_ema_warmup_forgets_the_random_initialisation():
    from perturbdiff.train import EMA

    net = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.zero_()  # the "initialisation" the average starts from
    ema, plain = EMA(net, decay=0.999, every=1), EMA(net, decay=0.999, every=1, warmup=False)
    with torch.no_grad():
        net.weight.fill_(1.0)  # the trained weights, constant from step 1 on
    for step in range(1, 2001):
        ema.update(net, step)
        plain.update(net, step)
    init_share = 1.0 - float(ema.module.weight.mean())
    assert init_share < 1e-4, init_share
    assert 1.0 - float(plain.module.weight.mean()) == pytest.approx(0.999 ** 2000, rel=1e-3)  # 13.5 % left


def test_ema_follows_weights_loaded_into_its_source_and_a_new_source():
    from perturbdiff.train import EMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.5, every=1, warmup=False)
    ema.update(net, 1)  # lists the pairs
    new = {k: torch.full_like(v, 2.0) for k, v in net.state_dict().items()}
    for p in net.parameters():  # what a device move does: new data under the same Parameter objects
        p.data = p.data.clone()
    net.load_state_dict(new)  # copies into the tensors the EMA listed
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(net, 2)
    for name, p in net.named_parameters():
        torch.testing.assert_close(ema.module.get_parameter(name), 0.5 * before[name] + 0.5 * p.detach())
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((3,), 2.0))  # buffers are copied
    net[1].running_mean = torch.full((3,), 5.0)  # a device move replaces a buffer object
    ema.update(net, 3)
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((3,), 5.0))
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(-1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(other, 4)  # another source module: paired anew
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before["0.weight"] - 0.5)


def _scripted_validator(scores):
    """A validator whose scores are given (lower is better), one per validation."""
    it = iter(scores)

    def make(self, device):
        return lambda net: {"val_score": next(it)}

    return make


def test_after_train_the_object_holds_the_best_checkpoints_weights(tmp_path, monkeypatch):
    from perturbdiff.cli import main
    from perturbdiff.train import split_prefix

    adata, split = planted_data(n_per_group=40)
    monkeypatch.setattr(PerturbDiff, "_validator", _scripted_validator([1.0, 0.5, 2.0]))  # best at step 4 of 6
    model = PerturbDiff.from_config(tiny_config(max_steps=6, val_every=2), adata, split)
    model.train(out_dir=tmp_path / "run", progress=False)
    best, meta = load_checkpoint(tmp_path / "run" / "best.safetensors", prefixes=("ema.",))
    assert meta["state"]["best_step"] == 4
    last = split_prefix(load_checkpoint(tmp_path / "run" / "last.safetensors", prefixes=("ema.",))[0], "ema")
    held = model.network.state_dict()
    assert all(torch.equal(held[k], v) for k, v in split_prefix(best, "ema").items())
    assert not all(torch.equal(held[k], v) for k, v in last.items())
    # the Python API and the CLI predict the same cells
    adata.write_h5ad(tmp_path / "data.h5ad")
    split.write(tmp_path / "split.json")
    assert main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "data.h5ad"), "--split",
                 str(tmp_path / "split.json"), "--out", str(tmp_path / "pred.h5ad")]) == 0
    import anndata as ad

    cli = ad.read_h5ad(tmp_path / "pred.h5ad")
    py = model.predict(progress=False)
    np.testing.assert_array_equal(cli.X.toarray(), py.X.toarray())


def test_train_max_steps_rescales_the_learning_rate_schedule(tmp_path):
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=200, val_every=1000, log_every=1, warmup_steps=5)
    model = PerturbDiff.from_config(cfg, adata, split).train(max_steps=30, out_dir=tmp_path, progress=False)
    lr = pd.read_csv(tmp_path / "log.csv")["lr"].to_numpy()
    want = cfg.train.lr * lr_factor(29, cfg.update({"train": {"max_steps": 30}}).train)
    assert lr[-1] == pytest.approx(want, rel=1e-4)
    assert lr[-1] < 0.2 * cfg.train.lr  # the cosine has reached (near) its floor of 0.1
    assert model.cfg.train.max_steps == 30  # and the run records its real budget
    assert "max_steps = 30" in (tmp_path / "config.toml").read_text()


def test_no_weight_decay_on_biases_and_norms_by_role():
    from perturbdiff.nn import Denoiser
    from perturbdiff.train._optim import param_groups

    cfg = Config.from_preset("tiny").model
    net = Denoiser(cfg, 12, {"pert": 5, "contexts": [3], "batch": 1, "dose": 1}, n_datasets=2)
    decay, no_decay = param_groups(net, 0.01)
    ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in ids}
    assert net.x_in.bias.ndim == 2 and "x_in.bias" in names  # the per-data-set [D, out] bias
    assert "final.linear.bias" in names and "cov_encoder.null" in names
    assert all(n.endswith("bias") or "norm" in n or n.endswith("null") for n in names), names
    assert all(n in names for n, _ in net.named_parameters() if n.endswith("bias"))
    assert any(n.endswith("q_norm.weight") for n in names)
    assert id(net.x_in.weight) in {id(p) for p in decay["params"]}


def test_adamw_is_fused_where_torch_has_the_kernel_and_foreach_where_it_has_not(monkeypatch):
    from perturbdiff.train._optim import make_optimizer

    net, cfg = torch.nn.Linear(4, 3), Config.from_preset("tiny").train
    opt = make_optimizer(net, cfg)
    assert opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]  # torch >= 2.4 on a CPU
    real = torch.optim.AdamW

    def without_cpu_kernel(params, fused=None, **kw):  # what torch < 2.4 says for a CPU parameter
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, fused=fused, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", without_cpu_kernel)
    opt = make_optimizer(net, cfg)
    assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"]
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["weight_decay"] == cfg.weight_decay


def test_both_self_conditioning_passes_see_one_label_dropout():
    from perturbdiff.diffusion import make_process
    from perturbdiff.nn import Denoiser

    cfg = Config.from_preset("tiny").update({"model": {"context_dropout": 0.5, "pert_dropout": 0.5,
                                                        "batch_dropout": 0.5},
                                             "diffusion": {"self_cond_prob": 1.0}})
    net = Denoiser(cfg.model, 10, {"pert": 8, "contexts": [4], "batch": 3, "dose": 1}).train()
    seen = []
    for emb in (net.cov_encoder.contexts[0], net.cov_encoder.pert, net.cov_encoder.batch):
        emb.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    B, S = 64, 4
    batch = {"target": torch.rand(B, S, 10), "control": torch.rand(B, S, 10),
             "pert": torch.randint(3, 8, (B, 2)), "context": torch.randint(1, 4, (B, 1)),
             "batch": torch.randint(1, 3, (B,)), "dose": torch.zeros(B, dtype=torch.long)}
    torch.manual_seed(0)
    make_process(cfg.diffusion).loss(net, batch, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 6
    for first, second in zip(seen[:3], seen[3:]):
        assert torch.equal(first, second)
    pert, context = seen[0], seen[1]  # forward order: perturbation parts, context, batch
    assert (context == 0).any() and (context != 0).any()  # dropout did replace some labels
    assert (pert == 2).any()  # and some perturbation parts became the generic token


def test_training_draws_do_not_depend_on_unsaved_generator_state(tmp_path):
    """The next step follows from (seed, step) alone: a GPU resume, whose CUDA generator is not saved, is exact."""
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=4, val_every=1000, log_every=1)

    def losses(disturb: bool):
        model = PerturbDiff.from_config(cfg, adata, split)
        trainer = Trainer(model.network, model.process, _dataset(model), model.cfg, meta=model._meta)
        batches = trainer.loader.stream()
        out = []
        for _ in range(4):
            if disturb:
                torch.manual_seed(1234)  # what a lost generator state looks like
            out.append(trainer.train_step(batches)["loss"])
        return out

    assert losses(False) == losses(True)


def _dataset(model: PerturbDiff):
    from perturbdiff.data import CellSetDataset, CellSetIndex

    index = CellSetIndex.build(model.adata, model.keys, model.split.train)
    return CellSetDataset(model.adata, index, model.vocab, set_size=model.cfg.data.set_size, seed=0,
                          control_set_fraction=model.cfg.data.control_set_fraction, codec=model.codec)


def test_without_a_run_directory_train_also_keeps_the_best_weights(monkeypatch):
    adata, split = planted_data(n_per_group=40)
    monkeypatch.setattr(PerturbDiff, "_validator", _scripted_validator([1.0, 0.5, 2.0]))  # best at step 4 of 6
    seen = {}
    real = Trainer._validate

    def spy(self):
        out = real(self)
        seen[self.state.step] = {k: v.clone() for k, v in self.ema.state_dict().items()}
        return out

    monkeypatch.setattr(Trainer, "_validate", spy)
    model = PerturbDiff.from_config(tiny_config(max_steps=6, val_every=2), adata, split).train(progress=False)
    held = model.network.state_dict()
    assert all(torch.equal(held[k], v) for k, v in seen[4].items())
    assert not all(torch.equal(held[k], v) for k, v in seen[6].items())


def test_a_run_with_de_weighted_set_means_trains_and_records_its_weight(tmp_path):
    adata, split = planted_data(n_per_group=32)
    cfg = tiny_config(max_steps=20, val_every=10).update({"diffusion": {"mean_de_weight": 1.0, "mean_de_cap": 3.0}})
    model = PerturbDiff.from_config(cfg, adata, split)
    model.train(out_dir=tmp_path, progress=False)
    log = pd.read_csv(tmp_path / "log.csv")
    assert np.isfinite(log["loss"]).all() and log["mean"].notna().any()
    loaded = PerturbDiff.load(tmp_path).cfg.diffusion
    assert (loaded.mean_de_weight, loaded.mean_de_cap) == (1.0, 3.0)
    with pytest.raises(ConfigError, match="mean_de_weight"):
        cfg.update({"diffusion": {"mean_de_weight": -1.0}}).validate()
    with pytest.raises(ConfigError, match="mean_de_cap"):
        cfg.update({"diffusion": {"mean_de_cap": -1.0}}).validate()


def test_validation_cells_are_a_fixed_random_draw_or_the_first_cells():
    from perturbdiff.data import validation_cells

    groups = [np.arange(100, 300), np.arange(5, 15)]
    first = validation_cells(groups, 0, seed=0, set_size=8)  # 0: the first 2 × set_size rows, as before
    assert [g.tolist() for g in first] == [list(range(100, 116)), list(range(5, 15))]
    drawn = validation_cells(groups, 50, seed=0, set_size=8)
    assert [len(g) for g in drawn] == [50, 10]  # capped at the condition's cells
    assert all(len(np.unique(g)) == len(g) and np.isin(g, src).all() and (np.diff(g) > 0).all()
               for g, src in zip(drawn, groups))
    assert drawn[0].max() > 150  # not the first rows: the draw spans the condition
    assert all(np.array_equal(a, b) for a, b in zip(drawn, validation_cells(groups, 50, seed=0, set_size=8)))
    assert not np.array_equal(drawn[0], validation_cells(groups, 50, seed=1, set_size=8)[0])


def test_a_run_validates_on_val_cells_drawn_cells(tmp_path):
    adata, split = planted_data(n_per_group=48)
    cfg = tiny_config(max_steps=10, val_every=5).update({"train": {"val_cells": 40}})
    PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "drawn", progress=False)
    plain = PerturbDiff.from_config(cfg.update({"train": {"val_cells": 0}}), adata, split)
    plain.train(out_dir=tmp_path / "first", progress=False)
    drawn, first = (pd.read_csv(tmp_path / d / "log.csv")["val_ed"].dropna().to_numpy() for d in ("drawn", "first"))
    assert len(drawn) == 2 and np.isfinite(drawn).all()
    assert not np.allclose(drawn, first)  # the same training, scored on other cells
    assert PerturbDiff.load(tmp_path / "drawn").cfg.train.val_cells == 40
    with pytest.raises(ConfigError, match="val_cells"):
        cfg.update({"train": {"val_cells": -1}}).validate()


def test_selection_score_weighs_the_mean_response_only_when_asked():
    from perturbdiff.train._loop import selection_score

    scores = {"val_score": 0.8, "val_ed": 0.8, "val_pearson_delta": 0.25}
    assert selection_score(scores, "ed") == 0.8
    assert selection_score(scores, "ed_pearson") == pytest.approx(0.6)
    # a worse population with a much better mean response wins under ed_pearson only
    better_mean = {"val_score": 0.9, "val_ed": 0.9, "val_pearson_delta": 0.5}
    assert selection_score(better_mean, "ed") > selection_score(scores, "ed")
    assert selection_score(better_mean, "ed_pearson") < selection_score(scores, "ed_pearson")
    assert selection_score({**scores, "val_pearson_delta": float("nan")}, "ed_pearson") == 0.8  # undefined: ED


def test_a_run_picks_its_best_checkpoint_by_val_select(tmp_path):
    adata, split = planted_data(n_per_group=48)
    cfg = tiny_config(max_steps=15, val_every=5).update({"train": {"val_select": "ed_pearson"}})
    model = PerturbDiff.from_config(cfg, adata, split)
    model.train(out_dir=tmp_path / "run", progress=False)
    log = pd.read_csv(tmp_path / "run" / "log.csv").dropna(subset=["val_ed"])
    assert len(log) == 3
    np.testing.assert_allclose(log["val_score"], log["val_ed"] * (1 - log["val_pearson_delta"]), rtol=1e-4)
    best = load_checkpoint(tmp_path / "run" / "best.safetensors")[1]
    assert best["state"]["best_step"] == int(log["step"].iloc[int(np.argmin(log["val_score"]))])
    assert PerturbDiff.load(tmp_path / "run").cfg.train.val_select == "ed_pearson"
    with pytest.raises(ConfigError, match="val_select"):
        cfg.update({"train": {"val_select": "pearson"}}).validate()


def test_the_choosing_validator_keeps_the_weight_that_scores_best():
    from types import SimpleNamespace

    from perturbdiff.model._guidance import choosing_validator

    ed = {0.0: 0.9, -0.5: 0.7, -1.0: 0.8}
    pearson = {0.0: 0.6, -0.5: 0.1, -1.0: 0.5}
    seen = []

    def fake(net, settings=None):
        w = 0.0 if settings is None else settings.guidance
        seen.append(w)
        return {"val_score": ed[w], "val_ed": ed[w], "val_pearson_delta": pearson[w]}

    run = SimpleNamespace(cfg=tiny_config().update({"train": {"val_guidance": "0,-0.5,-1"}}), summary={})
    out = choosing_validator(fake, run)(None)
    assert seen == [0.0, -0.5, -1.0]  # every candidate scored, in order
    assert out == {"val_score": 0.7, "val_ed": 0.7, "val_pearson_delta": 0.1, "val_guidance": -0.5}
    assert run.summary["guidance"] == {"chosen": -0.5, "scores": {"0.0": 0.9, "-0.5": 0.7, "-1.0": 0.8}}
    # by ED × (1 − pearson_delta) the conditional branch's better mean response wins instead
    run.cfg = run.cfg.update({"train": {"val_select": "ed_pearson"}})
    assert choosing_validator(fake, run)(None)["val_guidance"] == 0.0  # 0.36 < 0.4 (-1) < 0.63 (-0.5)
    run.cfg = tiny_config(val_guidance="")  # no candidates: the plain validator, untouched
    assert choosing_validator(fake, run) is fake


def test_a_run_chooses_its_guidance_weight_on_validation_and_predicts_at_it(tmp_path):
    adata, split = planted_data(n_per_group=48)
    cfg = tiny_config(max_steps=15, val_every=5).update({"train": {"val_guidance": "0,-1"}})
    model = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "run", progress=False)
    log = pd.read_csv(tmp_path / "run" / "log.csv").dropna(subset=["val_ed"])
    assert len(log) == 3 and set(log["val_guidance"]) <= {0.0, -1.0}
    best = int(load_checkpoint(tmp_path / "run" / "best.safetensors")[1]["state"]["best_step"])
    at_best = log[log["step"] == best].iloc[0]
    chosen = model.summary["guidance"]
    assert chosen["chosen"] == at_best["val_guidance"]
    assert min(chosen["scores"].values()) == pytest.approx(at_best["val_score"], rel=1e-4)
    loaded = PerturbDiff.load(tmp_path / "run", adata=adata)
    assert loaded.summary["guidance"] == chosen and loaded.sample_settings().guidance == chosen["chosen"]
    kw = dict(subset="test", n_cells=16, seed=0, include_controls=False, progress=False)
    plain = loaded.predict(**kw)
    assert json.loads(plain.uns["perturbdiff"]["settings"])["guidance"] == chosen["chosen"]
    np.testing.assert_array_equal(plain.X.toarray(), loaded.predict(**kw, guidance=chosen["chosen"]).X.toarray())
    other = -1.0 if chosen["chosen"] == 0.0 else 0.0
    assert not np.array_equal(plain.X.toarray(), loaded.predict(**kw, guidance=other).X.toarray())
    # without a run folder the choice is the validator's at the best step, kept in memory
    memory = PerturbDiff.from_config(cfg, adata, split).train(progress=False)
    assert memory.summary["guidance"]["chosen"] in (0.0, -1.0)
    assert memory.summary["guidance"] == memory.trainer.validate.history[memory.trainer.state.best_step]
    with pytest.raises(ConfigError, match="val_guidance"):
        cfg.update({"train": {"val_guidance": "0,-1.5"}}).validate()
