"""A fixed-seed tiny run through every generation path, for the behaviour-unchanged test (tests/test_compat.py).

``python tests/compat_run.py tests/fixtures`` wrote ``tests/fixtures/`` with the code of commit 387f5b4, before the
redesign into model/, the process protocol and the codec: two checkpoints (a task run and a pretraining run) and
the cells each path predicted. The test re-runs the same steps with today's code and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from perturbdiff import Config, PerturbDiff, Pretrained, finetune
from perturbdiff.data import DataKeys, make_split, marginal_source, preprocess
from perturbdiff.datasets import simulate

SETTINGS = {"model.hidden": 32, "model.depth": 1, "model.heads": 2, "model.cov_dim": 16, "data.set_size": 16,
            "data.batch_sets": 4, "train.max_steps": 12, "train.val_every": 6, "train.warmup_steps": 3,
            "train.log_every": 1, "sample.steps": 4, "diffusion.process": "vp",
            # keys introduced after the fixtures were written, at the values that reproduce them (config.INTRODUCED)
            "model.prior_dropout": 0.0, "model.continuous_dose": False,
            "model.anchor": "", "train.val_guidance": "",
            # preset tiny's LR when the fixtures were written (2.8e-3 since its batch doubled)
            "train.lr": 2e-3}
PERTS = ["G0034", "G0027"]


def tiny_data():
    """400 simulated cells, 40 genes, log1p; a split holding out part of context CT1."""
    keys = DataKeys("perturbation", "control", ("cell_type",), "counts", batch_key="batch")
    prep = preprocess(simulate(400, 60, n_cell_types=3, n_batches=2, n_perturbations=4, n_combos=1, seed=0), keys,
                      n_hvg=40)
    return prep, make_split(prep, keys, "held-out-contexts-partial", holdout="CT1", seed=0)


def config() -> Config:
    return Config.from_preset("tiny").update(SETTINGS)


def dense(a) -> np.ndarray:
    return np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, np.float32)


def predictions(model, pre, prep, split) -> dict[str, np.ndarray]:
    """What every generation path gives for a trained task model and a pretrained one."""
    ctrl = prep[prep.obs["perturbation"] == "control"]
    return {
        "test": dense(model.predict(progress=False, include_controls=False)),
        "test_guided": dense(model.predict(progress=False, guidance=1.0, n_samples=2, seed=3, include_controls=False)),
        "own_controls": dense(model.predict_for_controls(ctrl, PERTS, context_keys="cell_type", input_kind="log1p",
                                                         n_cells=20, progress=False)),
        "zero_shot": dense(pre.zero_shot(prep, split=split, n_cells=20, progress=False, include_controls=False)),
    }


def run(out: Path | None = None):
    """Train both runs from scratch; returns their predictions (and writes the fixtures when ``out`` is given)."""
    prep, split = tiny_data()
    model = PerturbDiff.from_config(config(), prep, split).train(progress=False, device="cpu")
    sources = [marginal_source(prep, "task")]
    pre = Pretrained.from_sources(config(), sources).train(sources, max_steps=6, progress=False, device="cpu")
    tuned = finetune(pre, config(), prep, split, io_layers="keep").train(max_steps=4, progress=False, device="cpu")
    preds = predictions(model, pre, prep, split)
    preds["finetuned"] = dense(tuned.predict(progress=False, include_controls=False))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save(out / "run_v0")
        pre.save(out / "pretrain_v0")
        np.savez_compressed(out / "expected_v0.npz", **preds)
    return preds


if __name__ == "__main__":
    run(Path(sys.argv[1]))
