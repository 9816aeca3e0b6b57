"""Behaviour unchanged across the redesign: checkpoints written before it still load and predict the same cells,
and the same fixed-seed tiny run trained today predicts what it predicted then (``tests/compat_run.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compat_run import PERTS, Pretrained, config, dense, run, tiny_data
from perturbdiff import PerturbDiff

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore:the genes were chosen")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected_v0.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def test_a_checkpoint_written_before_the_redesign_predicts_the_same_cells(expected, data):
    prep, split = data
    model = PerturbDiff.load(FIXTURES / "run_v0", adata=prep)
    assert model.cfg.to_dict() == config().to_dict()
    np.testing.assert_allclose(dense(model.predict(progress=False, include_controls=False)), expected["test"],
                               atol=1e-5)
    ctrl = prep[prep.obs["perturbation"] == "control"]
    own = model.predict_for_controls(ctrl, PERTS, context_keys="cell_type", input_kind="log1p", n_cells=20,
                                     progress=False)
    np.testing.assert_allclose(dense(own), expected["own_controls"], atol=1e-5)


def test_a_pretraining_checkpoint_written_before_the_redesign_predicts_the_same_cells(expected, data):
    prep, split = data
    pre = Pretrained.load(FIXTURES / "pretrain_v0")
    got = pre.zero_shot(prep, split=split, n_cells=20, progress=False, include_controls=False)
    np.testing.assert_allclose(dense(got), expected["zero_shot"], atol=1e-5)


def test_the_same_fixed_seed_run_trained_today_predicts_the_same_cells(expected):
    got = run()
    assert set(got) == set(expected)
    for name, cells in expected.items():  # 12 steps of AdamW: only float rounding of another CPU may differ
        np.testing.assert_allclose(got[name], cells, atol=1e-3, err_msg=name)
        assert ((got[name] > 0) == (cells > 0)).mean() > 0.99, name


def test_a_config_written_before_a_key_existed_keeps_the_value_its_run_used():
    """Checkpoints of the fixtures predate diffusion.process: they are VP runs whatever today's default is."""
    from perturbdiff.config import Config

    written = Config().update({"diffusion.process": "flow"}).to_dict()
    assert Config.from_checkpoint(written).diffusion.process == "flow"  # a key the run wrote is kept
    del written["diffusion"]["process"]
    assert Config.from_checkpoint(written).diffusion.process == "vp"  # a key it predates takes the old value
    assert PerturbDiff.load(FIXTURES / "run_v0").process.kind == "vp"
