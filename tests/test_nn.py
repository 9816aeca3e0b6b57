"""Tests of perturbdiff.nn: shapes, initialisation, equivariance over cells, conditioning paths."""

from __future__ import annotations

import pytest
import torch

from perturbdiff.config import ModelConfig
from perturbdiff.nn import (
    CovariateEncoder,
    Denoiser,
    TwoStreamBlock,
    count_parameters,
    preset_parameter_counts,
    timestep_embedding,
)

B, S, G = 3, 6, 12
VOCAB = {"pert": 7, "contexts": [4, 3], "batch": 3, "dose": 2}


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"hidden": 32, "depth": 2, "heads": 4, "cov_dim": 8, "context_dropout": 0.0, **kw})


def make_inputs(seed: int = 0, b: int = B) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, S, G, generator=g)
    x_self = torch.rand(b, S, G, generator=g)
    x_ctrl = torch.rand(b, S, G, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cov = {
        "pert": torch.randint(1, VOCAB["pert"], (b, 2), generator=g),
        "context": torch.stack([torch.randint(0, n, (b,), generator=g) for n in VOCAB["contexts"]], dim=1),
        "batch": torch.randint(0, VOCAB["batch"], (b,), generator=g),
        "dose": torch.randint(0, VOCAB["dose"], (b,), generator=g),
    }
    return x_t, x_self, x_ctrl, t, cov


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with noise so conditioning paths (zero at init) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def test_forward_shape_and_a_signed_raw_output():
    """The network is a plain module: its raw head is signed (the output form is the process's), and not all
    negative at init, so the process's ReLU lets the output head learn."""
    model = Denoiser(tiny_cfg(), G, VOCAB)
    out = model(*make_inputs())
    assert out.shape == (B, S, G)
    assert out.dtype == torch.float32
    assert (out > 0).any() and (out < 0).any()


def test_blocks_are_identity_at_init():
    model = Denoiser(tiny_cfg(), G, VOCAB)
    x, xc, c = torch.randn(B, S, 32), torch.randn(B, S, 32), torch.randn(B, 32)
    for block in model.blocks:
        ox, oc = block(x, xc, c)
        assert torch.equal(ox, x) and torch.equal(oc, xc)
    fresh = TwoStreamBlock(32, 4)  # default (random) modulation init: not the identity
    assert not torch.equal(fresh(x, xc, c)[0], x)


def test_initialize_weights_zero_modulation_and_normal_head():
    model = randomized(Denoiser(tiny_cfg(), G, VOCAB))
    model.initialize_weights()
    for block in model.blocks:
        for stream in (block.target, block.control):
            assert not stream.adaLN_modulation[-1].weight.any() and not stream.adaLN_modulation[-1].bias.any()
    assert not model.final.adaLN_modulation[-1].weight.any()
    head = model.final.linear.weight
    assert head.abs().sum() > 0 and 0.01 < head.std().item() < 0.03


def test_gradients_reach_head_and_input_at_init():
    model = Denoiser(tiny_cfg(), G, VOCAB)
    model(*make_inputs()).pow(2).sum().backward()
    assert model.final.linear.weight.grad.abs().sum() > 0
    assert model.x_in.weight.grad.abs().sum() > 0
    assert model.blocks[0].target.adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_permutation_equivariance_over_cells():
    model = randomized(Denoiser(tiny_cfg(), G, VOCAB))
    x_t, x_self, x_ctrl, t, cov = make_inputs()
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(3))
    out = model(x_t, x_self, x_ctrl, t, cov)
    out_p = model(x_t[:, perm], x_self[:, perm], x_ctrl[:, perm], t, cov)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 1])  # cells are not all mapped to the same output


def test_control_cells_influence_targets_through_joint_attention():
    model = randomized(Denoiser(tiny_cfg(), G, VOCAB))
    x_t, x_self, x_ctrl, t, cov = make_inputs()
    shifted = x_ctrl.clone()
    shifted[:, 0] += 1.0  # change a single control cell
    assert not torch.allclose(model(x_t, x_self, x_ctrl, t, cov), model(x_t, x_self, shifted, t, cov))


def test_no_self_conditioning_input_is_a_zero_one():
    """x_self None (the first self-conditioning pass) skips half the input layer; the function is unchanged."""
    model = randomized(Denoiser(tiny_cfg(), G, VOCAB))
    x_t, x_self, x_ctrl, t, cov = make_inputs()
    torch.testing.assert_close(model(x_t, None, x_ctrl, t, cov), model(x_t, torch.zeros_like(x_self), x_ctrl, t, cov),
                               atol=1e-5, rtol=1e-5)


def test_only_the_chosen_sets_are_computed_as_the_whole_batch_computes_them():
    """The first self-conditioning pass computes the sets that read it alone: with label dropout on, each chosen
    set's output equals the full batch's for it (the same draws), and the others stay zero."""
    cfg = tiny_cfg(context_dropout=0.5, batch_dropout=0.5, pert_dropout=0.5)
    model = randomized(Denoiser(cfg, G, VOCAB)).train()
    x_t, _, x_ctrl, t, cov = make_inputs()
    only = torch.tensor([True, False, True])
    torch.manual_seed(5)
    full = model(x_t, None, x_ctrl, t, cov)
    torch.manual_seed(5)
    part = model(x_t, None, x_ctrl, t, cov, only=only)
    torch.testing.assert_close(part[only], full[only], atol=1e-5, rtol=1e-5)
    assert (part[~only] == 0).all()
    torch.manual_seed(6)
    assert not torch.allclose(model(x_t, None, x_ctrl, t, cov)[only], full[only])  # the labels do drop here


def test_uncond_rows_ignore_covariates():
    model = randomized(Denoiser(tiny_cfg(), G, VOCAB))
    x_t, x_self, x_ctrl, t, cov = make_inputs(0)
    other = make_inputs(1)[4]
    uncond = torch.tensor([True, False, True])
    a = model(x_t, x_self, x_ctrl, t, cov, uncond)
    b = model(x_t, x_self, x_ctrl, t, other, uncond)
    torch.testing.assert_close(a[uncond], b[uncond])
    assert not torch.allclose(a[~uncond], b[~uncond])


def test_perturbation_parts_sum_and_padding():
    enc = randomized(CovariateEncoder(VOCAB, 8, 32), seed=1)
    base = {"context": torch.tensor([[1, 2]]), "batch": torch.tensor([1]), "dose": torch.tensor([0])}
    one = enc({**base, "pert": torch.tensor([[3]])})
    padded = enc({**base, "pert": torch.tensor([[3, 0, 0]])})
    torch.testing.assert_close(one, padded)
    ab = enc({**base, "pert": torch.tensor([[3, 5]])})
    ba = enc({**base, "pert": torch.tensor([[5, 3]])})
    torch.testing.assert_close(ab, ba)
    assert not torch.allclose(ab, one)
    torch.testing.assert_close(
        enc._pert(torch.tensor([[3, 5]])), enc._pert(torch.tensor([[3], [5]])).sum(0, keepdim=True)
    )


def test_combination_parts_have_their_own_dropout():
    enc = randomized(CovariateEncoder(VOCAB, 8, 32, pert_dropout=0.0, combo_dropout=1.0), seed=1).train()
    pert = torch.tensor([[3, 0], [4, 0], [3, 5], [6, 4]])  # two singles (padded), two combinations
    generic = torch.tensor([[3, 0], [4, 0], [2, 2], [2, 2]])
    torch.testing.assert_close(enc._pert(pert), enc.eval()._pert(generic))  # singles kept, every combo part dropped
    enc = CovariateEncoder(VOCAB, 8, 32, pert_dropout=1.0, combo_dropout=0.0).train()
    torch.testing.assert_close(enc._pert(pert), enc.eval()._pert(torch.tensor([[2, 0], [2, 0], [3, 5], [6, 4]])))
    assert CovariateEncoder(VOCAB, 8, 32, pert_dropout=0.3).combo_dropout == 0.3  # unset: the same share
    assert Denoiser(tiny_cfg(pert_dropout=0.1), G, VOCAB).cov_encoder.combo_dropout == 0.1  # -1: pert_dropout
    assert Denoiser(tiny_cfg(pert_dropout_combo=0.4), G, VOCAB).cov_encoder.combo_dropout == 0.4


def test_external_pert_table_is_frozen_and_projected():
    table = torch.randn(VOCAB["pert"], 5)
    table[4] = 0  # a label the table lacks
    model = Denoiser(tiny_cfg(), G, VOCAB, pert_table=table)
    enc = model.cov_encoder
    assert "cov_encoder.pert_table" in model.state_dict()
    assert all(p is not enc.pert_table for p in model.parameters())
    assert count_parameters(model) == count_parameters(Denoiser(tiny_cfg(), G, VOCAB)) + 5 * 8 + 8
    randomized(model)(*make_inputs()).sum().backward()  # at init c has no effect (AdaLN-Zero)
    assert enc.pert_proj.weight.grad.abs().sum() > 0
    assert enc.pert_table.grad is None
    with pytest.raises(ValueError, match="pert_table"):
        Denoiser(tiny_cfg(), G, VOCAB, pert_table=torch.randn(3, 5))


def test_context_dropout_only_in_training():
    model = randomized(Denoiser(tiny_cfg(context_dropout=1.0, pert_dropout=0.0, batch_dropout=0.0), G, VOCAB))
    x_t, x_self, x_ctrl, t, cov = make_inputs()
    unknown = {**cov, "context": torch.zeros_like(cov["context"])}
    assert not torch.allclose(model(x_t, x_self, x_ctrl, t, cov), model(x_t, x_self, x_ctrl, t, unknown))
    model.train()
    torch.testing.assert_close(model(x_t, x_self, x_ctrl, t, cov), model(x_t, x_self, x_ctrl, t, unknown))


def test_timestep_embedding_shape_and_distinct():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 15)
    assert e.shape == (3, 15)
    assert not torch.allclose(e[0], e[1])


def test_autocast_bfloat16_cpu():
    model = Denoiser(tiny_cfg(), G, VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*make_inputs())
    assert out.shape == (B, S, G) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(*make_inputs()), atol=0.05, rtol=0.05)


def test_preset_parameter_counts_on_meta():
    counts = preset_parameter_counts(2000)
    assert set(counts) >= {"tiny", "small", "base"}
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 90e6 <= counts["base"] <= 120e6


