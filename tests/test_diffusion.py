"""Tests of perturbdiff.diffusion: schedule, forward process, set losses, the VP process (loss, DDIM sampling)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perturbdiff.config import Config, DiffusionConfig, ModelConfig, SampleConfig
from perturbdiff.data import ScaleCodec
from perturbdiff.diffusion import (
    PROCESSES,
    VPDiffusion,
    energy_distance,
    eps_from_x0,
    make_process,
    make_schedule,
    q_sample,
    rbf_mmd,
    respace_timesteps,
    x0_from_eps,
)
from perturbdiff.nn import Denoiser

B, S, G = 3, 8, 10
VOCAB = {"pert": 6, "contexts": [3], "batch": 2, "dose": 1}
SCHED = make_schedule()


def tiny_model(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=32, depth=2, heads=4, cov_dim=8, context_dropout=0.0)
    return Denoiser(cfg, G, VOCAB)


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "target": torch.rand(B, S, G, generator=g) * (torch.rand(B, S, G, generator=g) > 0.5),
        "control": torch.rand(B, S, G, generator=g),
        "pad": torch.arange(S).expand(B, S) >= S - 2,
        "pert": torch.randint(1, VOCAB["pert"], (B, 1), generator=g),
        "context": torch.randint(0, 3, (B, 1), generator=g),
        "batch": torch.randint(0, 2, (B,), generator=g),
        "dose": torch.zeros(B, dtype=torch.long),
    }


def cov_of(batch: dict) -> dict:
    return {k: batch[k] for k in ("pert", "context", "batch", "dose")}


class Recorder(nn.Module):
    """Wraps a model and records each call's batch size and inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None, only=None):
        self.calls.append({"b": x_t.shape[0], "x_t": x_t.clone(), "t": t.clone(), "ctrl": x_ctrl.clone(),
                           "x_self": None if x_self is None else x_self.clone(), "only": only})
        return self.model(x_t, x_self, x_ctrl, t, cov, uncond, only=only)


class ConstantModel(nn.Module):
    """Predicts a learnable x0 regardless of its input (isolates the loss / sampler arithmetic)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = nn.Parameter(x0.clone())

    def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None, only=None):
        return self.x0.expand(x_t.shape[0], -1, -1)


def training_loss(model, batch, cfg: DiffusionConfig, generator=None):
    return VPDiffusion(cfg).loss(model, batch, generator)


def reference_ed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 * torch.cdist(x, y).mean((1, 2)) - torch.cdist(x, x).mean((1, 2)) - torch.cdist(y, y).mean((1, 2))


# -- schedule and forward process ------------------------------------------------------------------
def test_schedule_linear_vp():
    assert SCHED.T == 1000
    torch.testing.assert_close(SCHED.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    abar = SCHED.alphas_cumprod
    assert (abar[1:] < abar[:-1]).all() and abar[-1] < 1e-4
    torch.testing.assert_close(SCHED.sqrt_alphas_cumprod**2 + SCHED.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000))


@pytest.mark.parametrize("t", [0, 99, 500, 999])
def test_q_sample_moments(t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((4, 200, 250), 0.7)
    tt = torch.full((4,), t)
    xt = q_sample(SCHED, x0, tt, torch.randn(x0.shape, generator=g))
    abar = SCHED.alphas_cumprod[t].item()
    assert abs(xt.mean().item() - abar**0.5 * 0.7) < 0.01
    assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 0.01) + 2e-4


def test_eps_x0_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, S, G, generator=g), torch.randn(4, S, G, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = q_sample(SCHED, x0, t, eps)
    torch.testing.assert_close(eps_from_x0(SCHED, xt, t, x0), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_from_eps(SCHED, xt[:3], t[:3], eps[:3]), x0[:3], atol=1e-4, rtol=1e-4)


def test_respacing():
    ts = respace_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    vp = VPDiffusion(DiffusionConfig())
    assert vp.timesteps(SampleConfig(start="truncated", truncated_start_t=99)) == list(range(99, -1, -1))
    assert len(respace_timesteps(10, 50)) == 10
    with pytest.raises(ValueError, match="sideways"):
        vp.timesteps(SampleConfig(start="sideways"))


# -- set losses ------------------------------------------------------------------------------------
def test_energy_distance_matches_reference_and_is_zero_for_identical_sets():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 7, G, generator=g), torch.rand(2, 9, G, generator=g) + 0.3
    torch.testing.assert_close(energy_distance(x, y), reference_ed(x, y), atol=1e-4, rtol=1e-4)
    # identical sets: 0 up to fp32 rounding of the matmul distance form (cross-set coincident points)
    assert energy_distance(x, x.clone()).abs().max() < 1e-3 < energy_distance(x, x + 0.05).min()
    assert (energy_distance(x, x + 0.5) > energy_distance(x, x + 0.1)).all()
    assert (energy_distance(x, x + 0.1) > 0).all()
    torch.testing.assert_close(energy_distance(x, y), energy_distance(y, x))


def test_energy_distance_finite_gradients_at_coincident_points():
    y = torch.rand(2, 5, G, generator=torch.Generator().manual_seed(1))
    x = torch.cat([y, y[:, :2]], dim=1).clone().requires_grad_(True)  # duplicates inside x and shared with y
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_energy_distance_masks_exclude_points():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 6, G, generator=g), torch.rand(2, 5, G, generator=g)
    x_junk = torch.cat([x, torch.full((2, 3, G), 50.0)], dim=1)
    mask = torch.arange(9).expand(2, 9) < 6
    torch.testing.assert_close(energy_distance(x_junk, y, mask_x=mask), energy_distance(x, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(energy_distance(y, x_junk, mask_y=mask), energy_distance(y, x), atol=1e-5, rtol=1e-5)


def test_energy_distance_autocast_stays_fp32():
    x = torch.rand(2, 6, G)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = energy_distance(x, x + 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, energy_distance(x, x + 0.2))


def test_rbf_mmd_orders_shifts_and_masks():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 40, G, generator=g), torch.randn(2, 40, G, generator=g)
    same, shifted = rbf_mmd(x, y), rbf_mmd(x, y + 1.5)
    assert torch.isfinite(same).all() and (shifted > same + 0.05).all() and same.abs().max() < 0.05
    x_junk = torch.cat([x, torch.full((2, 2, G), 30.0)], dim=1)
    mask = torch.arange(42).expand(2, 42) < 40
    torch.testing.assert_close(rbf_mmd(x_junk, y, mask_x=mask), same, atol=1e-5, rtol=1e-4)


# -- training loss ---------------------------------------------------------------------------------
def test_training_loss_backward_finite_and_self_conditioning():
    model, batch = Recorder(tiny_model()), make_batch()
    cfg = DiffusionConfig(self_cond_prob=1.0, p_uncond=0.5, mean_weight=0.0)
    loss, parts = training_loss(model, batch, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == {"mse", "ed", "loss"} and parts["ed"] > 0
    assert abs(parts["loss"] - (parts["mse"] + parts["ed"])) < 1e-5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert len(model.calls) == 2
    assert model.calls[0]["x_self"] is None and model.calls[1]["x_self"].any()  # None: the zero input, unread
    assert model.calls[0]["only"] is not None and model.calls[1]["only"] is None  # the first pass: chosen sets only
    model.calls.clear()
    training_loss(model, batch, DiffusionConfig(self_cond_prob=0.0))
    assert len(model.calls) == 1 and not model.calls[0]["x_self"].any()


def test_set_mean_term_adds_the_weighted_pseudobulk_error():
    model, batch = tiny_model(), make_batch()
    cfg = DiffusionConfig(mean_weight=2.0)
    _, parts = training_loss(model, batch, cfg, torch.Generator().manual_seed(0))
    assert parts["mean"] > 0
    assert abs(parts["loss"] - (parts["mse"] + parts["ed"] + 2.0 * parts["mean"])) < 1e-5


def test_set_mean_gene_weights_scale_each_genes_pseudobulk_error():
    from perturbdiff.diffusion._losses import set_mean_error

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(B, 4, G, generator=g), torch.randn(B, 4, G, generator=g)
    cell_w = torch.ones(B, 4)
    per_gene = (pred.mean(1) - target.mean(1)).pow(2)  # (B, G)
    w = torch.rand(B, G, generator=g) * 2
    assert torch.allclose(set_mean_error(pred, target, cell_w, None), per_gene.mean())
    assert torch.allclose(set_mean_error(pred, target, cell_w, None, torch.ones(B, G)), per_gene.mean())
    assert torch.allclose(set_mean_error(pred, target, cell_w, None, w), (per_gene * w).mean())


def test_training_loss_deterministic_for_generator():
    model, batch, cfg = tiny_model(), make_batch(), DiffusionConfig()
    a = training_loss(model, batch, cfg, torch.Generator().manual_seed(5))[1]
    b = training_loss(model, batch, cfg, torch.Generator().manual_seed(5))[1]
    c = training_loss(model, batch, cfg, torch.Generator().manual_seed(6))[1]
    assert a == b and a != c


def test_training_loss_ignores_padded_cells_and_masked_genes():
    batch = make_batch()
    batch["gene_mask"] = (torch.arange(G) < 6).expand(B, G)
    model = ConstantModel(torch.rand(S, G, generator=torch.Generator().manual_seed(1)))
    cfg = DiffusionConfig(self_cond_prob=0.0, control_skip=False)
    ref = training_loss(model, batch, cfg)[1]
    changed = {**batch, "target": batch["target"].clone()}
    changed["target"][:, S - 2 :] += 5.0  # padded cells
    changed["target"][:, :, 6:] += 5.0  # genes outside the mask
    out = training_loss(model, changed, cfg)[1]
    assert out == pytest.approx(ref, rel=1e-5)
    changed["target"][:, 0, 0] += 1.0  # a real cell on a kept gene
    assert training_loss(model, changed, cfg)[1]["mse"] != pytest.approx(ref["mse"])


def test_training_loss_control_dropout_and_autocast():
    model, batch = Recorder(tiny_model()), make_batch()
    cfg = DiffusionConfig(self_cond_prob=0.0, p_drop_control=1.0, p_uncond=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = training_loss(model, batch, cfg)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    zero = make_batch()
    zero["control"] = torch.zeros_like(zero["control"])
    g = torch.Generator
    a = training_loss(tiny_model(), batch, cfg, g().manual_seed(0))[1]
    b = training_loss(tiny_model(), zero, cfg, g().manual_seed(0))[1]
    assert a == pytest.approx(b)


# -- sampling --------------------------------------------------------------------------------------
def sample(model, seed, *, codec=None, control_skip=True, **kw):
    batch = make_batch()
    process = make_process(DiffusionConfig(process="vp", control_skip=control_skip), codec)
    return process.sample(model, batch["control"], cov_of(batch), SampleConfig(**kw),
                          generator=torch.Generator().manual_seed(seed))


def test_ddim_deterministic_per_generator():
    model = tiny_model()
    a, b, c = sample(model, 0, steps=5), sample(model, 0, steps=5), sample(model, 1, steps=5)
    assert a.shape == (B, S, G)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the mode is restored


def test_ddim_guidance_uses_one_doubled_forward_per_step():
    rec = Recorder(tiny_model())
    sample(rec, 0, steps=4, guidance=1.0)
    assert [c["b"] for c in rec.calls] == [2 * B] * 4
    rec.calls.clear()
    sample(rec, 0, steps=4, guidance=0.0)
    assert [c["b"] for c in rec.calls] == [B] * 4
    rec.calls.clear()
    sample(rec, 0, start="truncated", truncated_start_t=9)
    assert [int(c["t"][0]) for c in rec.calls] == list(range(9, -1, -1))
    assert not rec.calls[0]["x_self"].any() and rec.calls[1]["x_self"].any()  # self-conditioning fed back


def test_ddim_update_keeps_noise_for_a_constant_predictor():
    """With x̂0 fixed, deterministic DDIM keeps ε̂ equal to the initial noise at every step (η = 0)."""
    x0 = torch.rand(S, G, generator=torch.Generator().manual_seed(4))
    rec = Recorder(ConstantModel(x0))
    out = sample(rec, 7, steps=6, control_skip=False)
    eps = [eps_from_x0(SCHED, c["x_t"], c["t"], x0.expand(B, -1, -1)) for c in rec.calls]
    noise = torch.randn(B, S, G, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(rec.calls[0]["x_t"], noise)  # starts from pure noise
    for e in eps[1:]:
        torch.testing.assert_close(e, eps[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, x0.expand(B, -1, -1))


def test_the_codec_bounds_sampling_and_floors_its_output():
    codec = ScaleCodec(clip_max=0.3, zero_threshold=0.05, auto_zero=False)
    out = codec.zero_floor(sample(tiny_model(), 0, steps=3, guidance=2.0, codec=codec))
    assert (out >= 0).all() and out.max() <= 0.3
    assert not ((out > 0) & (out < 0.05)).any()


def test_the_output_form_belongs_to_the_process_not_the_network():
    """The network's raw output may be negative; the VP process adds the control mean and applies the ReLU of a
    non-negative codec, and a signed space (nonnegative=False) keeps the sign."""
    raw = -torch.rand(S, G, generator=torch.Generator().manual_seed(2)) - 0.5
    batch = make_batch()
    t = torch.full((B,), 10)
    args = (ConstantModel(raw), torch.zeros(B, S, G), torch.zeros(B, S, G), batch["control"], t, cov_of(batch))
    skip = batch["control"].mean(1, keepdim=True)
    torch.testing.assert_close(VPDiffusion(DiffusionConfig()).predict_x0(*args), torch.relu(raw + skip))
    signed = VPDiffusion(DiffusionConfig(control_skip=False), nonnegative=False).predict_x0(*args)
    torch.testing.assert_close(signed, raw.expand(B, -1, -1))
    dropped = VPDiffusion(DiffusionConfig()).predict_x0(*args, ctrl_drop=torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(dropped, torch.relu(raw).expand(B, -1, -1))  # no controls, no skip


def test_the_configured_process_kind_is_built():
    assert isinstance(make_process(Config().update({"diffusion.process": "vp"}).diffusion), PROCESSES["vp"])
    assert isinstance(make_process(Config().diffusion), PROCESSES[Config().diffusion.process])


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_a_network_trained_without_self_conditioning_is_never_fed_its_own_estimate(kind, guidance):
    batch = make_batch()
    for prob, fed in ((0.5, True), (0.0, False)):
        rec = Recorder(tiny_model())
        process = make_process(DiffusionConfig(process=kind, self_cond_prob=prob))
        process.sample(rec, batch["control"], cov_of(batch), SampleConfig(steps=4, guidance=guidance),
                       generator=torch.Generator().manual_seed(0))
        assert len(rec.calls) == 4 and not rec.calls[0]["x_self"].any()
        assert all(bool(c["x_self"].any()) == fed for c in rec.calls[1:])  # zeros, as in its training


def test_the_first_self_conditioning_pass_asks_only_networks_that_take_it_for_the_chosen_sets():
    from perturbdiff.diffusion._conditioning import only_kwargs

    only = torch.tensor([True, False])

    class Plain(nn.Module):
        def forward(self, x_t, x_self, x_ctrl, t, cov, uncond=None):
            return x_t

    class Passes:  # a wrapper that hands keyword arguments on, as DDP's does
        def __call__(self, *args, **kwargs):
            return kwargs

    assert only_kwargs(Plain(), only) == {} and only_kwargs(Passes(), None) == {}
    assert only_kwargs(Passes(), only)["only"] is only
    assert only_kwargs(Recorder(tiny_model()), only)["only"] is only
