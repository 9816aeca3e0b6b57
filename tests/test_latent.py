"""The latent codec (``codec.kind = "latent"``): the autoencoder, its zero model, and runs over latent cell sets
through training, save / load / predict, resume, own controls and the refusals."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbdiff import CheckpointError, ConfigError, DataError, PerturbDiff, Pretrained, finetune
from perturbdiff.config import CodecConfig, Config
from perturbdiff.data import (
    CellSetDataset,
    CellSetIndex,
    LatentCodec,
    ScaleCodec,
    as_csr,
    codec_from_meta,
    marginal_source,
)
from perturbdiff.train import load_checkpoint
from test_train import SHIFTED, _interrupt_at, assert_same_run, planted_data, tiny_config

AE = {"latent_dim": 8, "latent_hidden": 64, "latent_steps": 300, "latent_batch": 64}


def latent_config(**train) -> Config:
    return tiny_config(**train).update({"diffusion.process": "flow", "sample.steps": 4,
                                        "codec": {"kind": "latent", **AE}})


@pytest.fixture(scope="module")
def fitted(synthetic_prep):
    """An autoencoder fitted on the simulated Perturb-seq cells (600 x 100 genes)."""
    cfg = CodecConfig(kind="latent", latent_dim=16, latent_hidden=128, latent_steps=600, latent_batch=64)
    rows = np.arange(synthetic_prep.n_obs)
    return LatentCodec.from_config(synthetic_prep.n_vars, cfg, seed=0).fit(synthetic_prep.X, rows)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A latent-codec flow run on the planted data, trained 200 steps into a run directory."""
    out = tmp_path_factory.mktemp("latent")
    adata, split = planted_data()
    model = PerturbDiff.from_config(latent_config(), adata, split).train(out_dir=out, progress=False, device="cpu")
    return model, adata, split, out


# -- the autoencoder -------------------------------------------------------------------------------------------
def test_the_autoencoder_reconstructs_held_out_synthetic_cells(fitted, synthetic_prep):
    q = fitted.quality
    assert q["n_cells"] == 30  # 5 % of 600 cells held out of fitting
    assert q["cell_pearson"] > 0.6 and q["gene_mean_pearson"] > 0.95, q
    x = synthetic_prep.X[:200].toarray()
    z = fitted.to_model(x)
    assert z.shape == (200, 16) and z.dtype == np.float32
    assert abs(float(z.mean())) < 0.3 and 0.5 < float(z.std()) < 1.5  # standardised on the training cells


def test_the_zero_model_gives_zeros_at_the_data_rate(fitted, synthetic_prep):
    x = synthetic_prep.X.toarray()
    decoded = fitted.from_model(fitted.to_model(x), seed=1)
    rate, real = float(np.mean(decoded == 0)), float(np.mean(x == 0))
    assert abs(rate - real) < 0.03, (rate, real)
    assert decoded.min() >= 0.0
    mean = dataclasses.replace(fitted, zeros="mean").from_model(fitted.to_model(x))
    assert float(np.mean(mean == 0)) < 0.01  # p·value has no zeros: what the zero model is for
    np.testing.assert_array_equal(decoded, fitted.from_model(fitted.to_model(x), seed=1))  # seeded
    assert not np.array_equal(decoded, fitted.from_model(fitted.to_model(x), seed=2))


def test_the_codec_round_trips_through_its_dict_and_tensors(fitted, synthetic_prep):
    meta = {"codec": fitted.to_dict()}
    back = codec_from_meta(meta, None, {f"codec.{k}": v for k, v in fitted.tensors().items()})
    x = synthetic_prep.X[:50].toarray()
    np.testing.assert_array_equal(back.to_model(x), fitted.to_model(x))
    assert back.quality == fitted.quality and back.bound == fitted.bound
    with pytest.raises(CheckpointError, match="no weights"):
        codec_from_meta(meta, None, {})
    assert codec_from_meta({"codec": ScaleCodec().to_dict()}).kind == "scale"


def test_sets_are_latent_wide_whatever_the_gene_count(fitted, synthetic_prep, synthetic_keys):
    from perturbdiff.data import Vocab, make_split

    split = make_split(synthetic_prep, synthetic_keys, "held-out-contexts-partial", holdout="CT1", seed=0)
    index = CellSetIndex.build(synthetic_prep, synthetic_keys, split.train)
    vocab = Vocab.build(synthetic_prep, synthetic_keys, split.train)
    ds = CellSetDataset(synthetic_prep, index, vocab, set_size=8, seed=0, codec=fitted)
    b = ds.__getitems__([0, 1]).batched
    assert b["target"].shape == (2, 8, 16) and b["control"].shape == (2, 8, 16)
    rows = ds._target[[0, 1]].ravel()
    want = fitted.to_model(as_csr(synthetic_prep.X)[rows].toarray()).reshape(2, 8, 16)
    np.testing.assert_allclose(b["target"].numpy(), want, atol=1e-5)  # encoded once, gathered per step


# -- runs over latent cell sets --------------------------------------------------------------------------------
def test_a_latent_run_learns_the_planted_shift_and_writes_its_reconstruction(latent_run):
    model, adata, _, out = latent_run
    assert model.network.x_in.in_features == 2 * AE["latent_dim"]  # the denoiser never sees the 40 genes
    assert model.summary["codec"]["cell_pearson"] > 0.3
    cond = (("B",), "UP")
    pred = model.predict([cond], n_cells=64, include_controls=False, progress=False).X.toarray()
    ctrl = adata[(adata.obs["cell_type"] == "B").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    shift = pred.mean(0) - ctrl.X.toarray().mean(0)
    assert shift[SHIFTED].mean() > 1.0 > abs(np.delete(shift, SHIFTED).mean()), shift
    tensors, meta = load_checkpoint(out / "best.safetensors")
    assert meta["codec"]["kind"] == "latent" and any(k.startswith("codec.encoder.") for k in tensors)


def test_vp_diffusion_runs_over_latent_cells_too():
    adata, split = planted_data(n_per_group=64)
    cfg = latent_config(max_steps=150).update({"diffusion.process": "vp", "sample.steps": 10,
                                               "codec.latent_steps": 200})
    model = PerturbDiff.from_config(cfg, adata, split).train(progress=False, device="cpu")
    pred = model.predict([(("B",), "UP")], n_cells=64, include_controls=False, progress=False).X.toarray()
    ctrl = adata[(adata.obs["cell_type"] == "B").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    shift = pred.mean(0) - ctrl.X.toarray().mean(0)
    assert shift[SHIFTED].mean() > 1.0 > abs(np.delete(shift, SHIFTED).mean()), shift


def test_a_latent_run_round_trips_through_save_load_and_predict(latent_run, tmp_path):
    model, adata, _, out = latent_run
    back = PerturbDiff.load(out, adata=adata)
    assert back.codec.kind == "latent" and back.codec.quality == model.codec.quality
    a = model.predict(progress=False, seed=1).X.toarray()
    np.testing.assert_array_equal(a, back.predict(progress=False, seed=1).X.toarray())
    model.save(tmp_path / "one.safetensors")  # a single file holds the autoencoder too
    again = PerturbDiff.load(tmp_path / "one.safetensors", adata=adata)
    np.testing.assert_array_equal(a, again.predict(progress=False, seed=1).X.toarray())


def test_a_latent_run_predicts_for_the_users_own_controls(latent_run):
    model, adata, _, _ = latent_run
    ctrl = adata[(adata.obs["perturbation"] == "control").to_numpy()].copy()
    ctrl.obs = pd.DataFrame({"donor": ctrl.obs["cell_type"].astype(str).to_numpy()}, index=ctrl.obs_names)
    pred = model.predict_for_controls(ctrl, ["UP"], context_keys="donor", input_kind="log1p", progress=False,
                                      n_cells=32)
    gen = pred[pred.obs["predicted"].to_numpy(bool)].X.toarray()
    assert gen.shape == (3 * 32, 40) and gen.min() >= 0 and 0 < float(np.mean(gen == 0)) < 1


def test_a_latent_run_resumes_exactly_with_its_own_autoencoder(tmp_path, monkeypatch):
    adata, split = planted_data(n_per_group=40)
    cfg = latent_config(max_steps=6, val_every=2, log_every=1).update({"codec.latent_steps": 60})
    full = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "b", progress=False)
    with monkeypatch.context() as m:  # resuming must not fit another autoencoder
        m.setattr(LatentCodec, "fit", lambda *a, **k: pytest.fail("the autoencoder was fitted again"))
        resumed = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "b", progress=False)
    assert_same_run(tmp_path / "a", tmp_path / "b", full, resumed)


def test_gene_space_runs_keep_the_scale_codec_and_no_codec_tensors(tmp_path):
    adata, split = planted_data(n_per_group=40)
    model = PerturbDiff.from_config(tiny_config(max_steps=2, val_every=2), adata, split)
    model.train(out_dir=tmp_path, progress=False)
    tensors, meta = load_checkpoint(tmp_path / "best.safetensors")
    assert meta["codec"]["kind"] == "scale" and not any(k.startswith("codec.") for k in tensors)
    assert model.network.x_in.in_features == 2 * adata.n_vars


# -- refusals ----------------------------------------------------------------------------------------------------
def test_pretraining_and_mismatched_finetuning_are_refused_in_one_line(synthetic_prep, synthetic_keys):
    from perturbdiff.data import make_split

    cfg = Config.from_preset("tiny").update({"model.hidden": 16, "model.depth": 1, "model.heads": 2,
                                             "codec.kind": "latent"})
    with pytest.raises(ConfigError, match="pretraining works in gene space"):
        Pretrained.from_sources(cfg, [marginal_source(synthetic_prep, "task")])
    pre = Pretrained.from_sources(cfg.update({"codec.kind": "scale"}), [marginal_source(synthetic_prep, "task")])
    split = make_split(synthetic_prep, synthetic_keys, "held-out-contexts-partial", holdout="CT1", seed=0)
    with pytest.raises(ConfigError, match="io_layers='task'"):
        finetune(pre, cfg, synthetic_prep, split)
    model = finetune(pre, cfg.update({"codec": AE}), synthetic_prep, split, io_layers="task")
    assert model.codec.kind == "latent" and model.network.x_in.in_features == 2 * AE["latent_dim"]


def test_bad_codec_settings_are_named(synthetic_prep):
    with pytest.raises(ConfigError, match="codec.zeros"):
        Config().update({"codec.zeros": "never"}).validate()
    with pytest.raises(ConfigError, match="codec.latent_dim"):
        Config().update({"codec.latent_dim": 0}).validate()
    unfitted = LatentCodec.from_config(synthetic_prep.n_vars, CodecConfig(kind="latent"))
    with pytest.raises(CheckpointError, match="not been fitted"):
        unfitted.to_model(synthetic_prep.X[:2].toarray())
    with pytest.raises(DataError, match="needs training cells"):
        unfitted.fit(synthetic_prep.X, np.arange(1))


def test_the_command_line_trains_predicts_and_reports_a_latent_run(tmp_path, capsys):
    from perturbdiff.cli import main

    adata, split = planted_data(n_per_group=40)
    adata.write_h5ad(tmp_path / "data.h5ad")
    split.write(tmp_path / "split.json")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "data.h5ad"), "--split", str(tmp_path / "split.json"), "--preset", "tiny",
                 "--codec", "latent", "--max-steps", "4", "--set", "train.val_every=2", "--set", "data.set_size=16",
                 "--set", "codec.latent_steps=20", "--set", "codec.latent_dim=4", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["predict", str(run), "--data", str(tmp_path / "data.h5ad"), "--out", str(tmp_path / "pred.h5ad"),
                 "--no-progress"]) == 0
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "codec: latent, 40 genes -> 4 dimensions; held-out reconstruction: cell r" in out
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    card = json.loads(pred.uns["perturbdiff"]["run"])
    assert pred.n_vars == 40 and card["codec"] == "latent" and card["latent_dim"] == 4
