"""Flow matching (process = "flow"): the path, the endpoint/velocity parameterisations, the solvers, OT pairing,
training that recovers a planted shift from either source, and a flow checkpoint's round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perturbdiff import ConfigError, PerturbDiff, Pretrained
from perturbdiff.config import Config, DiffusionConfig, SampleConfig
from perturbdiff.data import marginal_source
from perturbdiff.diffusion import FlowMatching, make_process, ot_pairing, rbf_mmd, set_loss
from test_train import SHIFTED, planted_data, tiny_config

B, S, G = 3, 8, 10


class Recorder(nn.Module):
    """Returns ``fn(x_t, t)`` and records every call's input x_t and time."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None, only=None):
        self.calls.append({"x_t": x_t.clone(), "t": t.clone(), "b": x_t.shape[0]})
        return self.fn(x_t, t) + 0 * self.w


def flow(**cfg) -> FlowMatching:
    return FlowMatching(DiffusionConfig(process="flow", control_skip=False, **cfg))


def cov() -> dict:
    z = torch.zeros(B, dtype=torch.long)
    return {"pert": z[:, None], "context": z[:, None], "batch": z, "dose": z}


def test_a_perfect_endpoint_predictor_moves_euler_along_the_straight_path_to_x1():
    x1 = torch.rand(B, S, G, generator=torch.Generator().manual_seed(1))
    rec = Recorder(lambda x_t, t: x1)
    out = flow().sample(rec, torch.zeros(B, S, G), cov(), SampleConfig(steps=5, solver="euler"),
                        generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(B, S, G, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, x1) and len(rec.calls) == 5
    for call in rec.calls:  # x̂1 -> v̂ = (x̂1 - x_t) / (1 - t) -> Euler: every x_t lies on t·x1 + (1 - t)·x0
        t = float(call["t"][0]) / 1000.0
        torch.testing.assert_close(call["x_t"], t * x1 + (1 - t) * x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver,evals", [("heun", 7), ("rk4", None), ("dopri5", None)])
def test_every_solver_returns_x1_for_a_perfect_predictor(solver, evals):
    x1 = torch.rand(B, S, G, generator=torch.Generator().manual_seed(3))
    rec = Recorder(lambda x_t, t: x1)
    out = flow().sample(rec, torch.zeros(B, S, G), cov(), SampleConfig(steps=4, solver=solver))
    torch.testing.assert_close(out, x1)
    if evals is not None:
        assert len(rec.calls) == evals == flow().evaluations(SampleConfig(steps=4, solver=solver))


def test_a_perfect_velocity_predictor_transports_the_control_cells_to_the_target():
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.rand(B, S, G, generator=g), torch.rand(B, S, G, generator=g)
    proc = flow(flow_target="velocity", flow_source="control")
    out = proc.sample(Recorder(lambda x_t, t: x1 - x0), x0, cov(), SampleConfig(steps=3, solver="euler"))
    torch.testing.assert_close(out, x1)


def test_guidance_mixes_velocities_in_one_doubled_forward():
    rec = Recorder(lambda x_t, t: torch.ones_like(x_t))
    flow().sample(rec, torch.zeros(B, S, G), cov(), SampleConfig(steps=3, guidance=1.0))
    assert [c["b"] for c in rec.calls] == [2 * B] * 3


@pytest.mark.parametrize("w", [-1.0, -0.5, 0.0, 1.0])
def test_guidance_gives_the_blend_of_the_two_branches_endpoints(w):
    """(1 + w)·cond − w·uncond on velocities of perfect endpoint predictors lands on the same blend of the two
    endpoints (clipped at 0, where w > 0 extrapolates below it): w = -1 is the unconditional branch alone, -0.5
    the midpoint, 0 the conditional alone."""
    g = torch.Generator().manual_seed(7)
    x_cond, x_uncond = torch.rand(B, S, G, generator=g), torch.rand(B, S, G, generator=g)

    class TwoBranches(Recorder):
        def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None, only=None):
            mask = torch.zeros(x_t.shape[0], dtype=torch.bool) if uncond is None else uncond
            return torch.where(mask[:, None, None], x_uncond.repeat(x_t.shape[0] // B, 1, 1),
                               x_cond.repeat(x_t.shape[0] // B, 1, 1)) + 0 * self.w

    out = flow().sample(TwoBranches(None), torch.zeros(B, S, G), cov(), SampleConfig(steps=4, guidance=w))
    torch.testing.assert_close(out, ((1 + w) * x_cond - w * x_uncond).clamp_min(0))


def test_ot_pairing_is_a_permutation_with_the_least_squared_distance():
    g = torch.Generator().manual_seed(5)
    target = torch.rand(2, 6, 4, generator=g)
    perm = torch.randperm(6, generator=g)
    source = target[:, perm] + 0.01 * torch.rand(2, 6, 4, generator=g)
    paired = ot_pairing(source, target)
    torch.testing.assert_close(paired, target, atol=0.02, rtol=0)  # each source cell found its own target
    assert sorted(map(tuple, paired[0].tolist())) == sorted(map(tuple, source[0].tolist()))


def test_the_mmd_term_is_added_with_its_weight():
    g = torch.Generator().manual_seed(6)
    pred, target = torch.rand(B, S, G, generator=g), torch.rand(B, S, G, generator=g)
    base = set_loss(pred, target, ed_weight=1.0)[1]
    with_mmd = set_loss(pred, target, ed_weight=1.0, mmd_weight=0.5)[1]
    assert with_mmd["mmd"] == pytest.approx(float(rbf_mmd(pred, target).mean()), rel=1e-5)
    assert with_mmd["loss"] == pytest.approx(base["loss"] + 0.5 * with_mmd["mmd"], rel=1e-5)


@pytest.mark.parametrize("source", ["noise", "control"])
def test_flow_training_recovers_a_planted_shift(source):
    adata, split = planted_data()
    cfg = tiny_config(max_steps=200).update({"diffusion": {"process": "flow", "flow_source": source},
                                             "sample": {"steps": 4}})
    model = PerturbDiff.from_config(cfg, adata, split).train(progress=False, device="cpu")
    cond = (("B",), "UP")
    pred = model.predict([cond], n_cells=64, include_controls=False, progress=False).X.toarray().mean(0)
    ctrl = adata[(adata.obs["cell_type"] == "B").to_numpy() & (adata.obs["perturbation"] == "control").to_numpy()]
    shift = pred - ctrl.X.toarray().mean(0)
    assert shift[SHIFTED].mean() > 1.0 > abs(np.delete(shift, SHIFTED).mean()), shift


def test_a_flow_checkpoint_round_trips_with_its_process(tmp_path):
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=4, val_every=2).update({"diffusion.process": "flow", "diffusion.flow_pairing": "ot",
                                                         "diffusion.flow_source": "control", "sample.steps": 3})
    model = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path, progress=False, device="cpu")
    back = PerturbDiff.load(tmp_path, adata=adata)
    assert isinstance(back.process, FlowMatching) and back.info()["config"]["diffusion"]["process"] == "flow"
    a = model.predict(progress=False, device="cpu", seed=1).X.toarray()
    b = back.predict(progress=False, device="cpu", seed=1).X.toarray()
    np.testing.assert_array_equal(a, b)


def test_pretraining_with_a_flow_starts_from_noise_only(synthetic_prep):
    src = [marginal_source(synthetic_prep, "task")]
    cfg = Config.from_preset("tiny").update({"model.hidden": 16, "model.depth": 1, "model.heads": 2,
                                             "model.cov_dim": 8, "diffusion.process": "flow"})
    pre = Pretrained.from_sources(cfg, src).train(src, max_steps=2, progress=False, device="cpu")
    assert isinstance(pre.process, FlowMatching)
    with pytest.raises(ConfigError, match="flow_source"):
        Pretrained.from_sources(cfg.update({"diffusion.flow_source": "control"}), src)


def test_make_process_builds_the_flow():
    assert isinstance(make_process(Config().update({"diffusion.process": "flow"}).diffusion), FlowMatching)
