"""The set denoiser: a two-stream diffusion transformer over cells that predicts x0 (SPEC §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perturbdiff.config import PRESETS, Config, ModelConfig
from perturbdiff.nn._block import DatasetLinear, FinalLayer, TwoStreamBlock
from perturbdiff.nn._embed import CovariateEncoder, TimestepEmbedder

#: covariate vocabulary sizes used when only the parameter count matters
DEFAULT_VOCAB_SIZES = {"pert": 64, "contexts": [16], "batch": 8, "dose": 1}


class Denoiser(nn.Module):
    """MM-DiT x0-predictor: cells are tokens (no positional embedding, so permutation-equivariant over cells).

    Target stream input [x_t ; x̂0_self] (2G) -> Linear -> H. Control stream input [x_ctrl ; 0] -> Linear -> H
    is implemented as a Linear G -> H on x_ctrl: the zero half multiplies columns that never receive a
    gradient, so it is the same function with G·H fewer parameters. c = MLP(sinusoidal(t)) + CovEncoder(cov).
    Only the target stream is decoded, so no final layer is created for the control stream. The output is the raw
    head: its form (ReLU in a non-negative space, a skip from the control mean) belongs to the process.
    With ``n_datasets > 1`` (marginal pretraining on several data sets, SPEC §5) the target input layer and the
    output layer are per data set (:class:`DatasetLinear`), chosen per set by ``cov["dataset"]``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_genes: int,
        vocab_sizes: dict,
        *,
        pert_table: torch.Tensor | None = None,
        n_datasets: int = 1,
        dose_values: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_genes, self.n_datasets = int(n_genes), int(n_datasets)
        self.vocab_sizes = {k: list(v) if isinstance(v, (list, tuple)) else int(v) for k, v in vocab_sizes.items()}
        h = cfg.hidden
        self.x_in = nn.Linear(2 * n_genes, h)
        self.ctrl_in = nn.Linear(n_genes, h)
        self.t_embed = TimestepEmbedder(h)
        combo = cfg.pert_dropout if cfg.pert_dropout_combo < 0 else cfg.pert_dropout_combo
        self.cov_encoder = CovariateEncoder(
            vocab_sizes, cfg.cov_dim, h, pert_table=pert_table, context_dropout=cfg.context_dropout,
            pert_dropout=0.0 if cfg.anchor_unseen else cfg.pert_dropout,  # anchor_unseen: the data drops parts
            combo_dropout=0.0 if cfg.anchor_unseen else combo,
            batch_dropout=cfg.batch_dropout, prior_dropout=cfg.prior_dropout,
            interaction=cfg.pert_interaction, dose_values=dose_values if cfg.continuous_dose else None
        )
        self.blocks = nn.ModuleList(TwoStreamBlock(h, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final = FinalLayer(h, n_genes)
        self.initialize_weights()
        if self.n_datasets > 1:
            self.x_in = DatasetLinear(self.n_datasets, 2 * n_genes, h)
            self.final.linear = DatasetLinear(self.n_datasets, h, n_genes)
            with torch.no_grad():  # the output head starts normal, like the single-data-set head
                nn.init.normal_(self.final.linear.weight, std=0.02)

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears, N(0, 0.02) embeddings, zero AdaLN modulation; normal output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.cov_encoder.null, std=0.02)
        if self.cov_encoder.pair is not None:  # the combinations' pairwise term starts at zero: the sum of the parts
            nn.init.zeros_(self.cov_encoder.pair.weight)
            nn.init.zeros_(self.cov_encoder.pair.bias)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            for stream in (block.target, block.control):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        # Not zero (unlike DiT): a zero projection under the process's output ReLU would never receive a gradient.
        nn.init.normal_(self.final.linear.weight, std=0.02)
        nn.init.zeros_(self.final.linear.bias)

    def condition(self, t: torch.Tensor, cov: dict, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """c = MLP(sinusoidal(t)) + CovEncoder(cov), null covariate vector where uncond."""
        return self.t_embed(t) + self.cov_encoder(cov, uncond)  # (B, H)

    def forward(
        self,
        x_t: torch.Tensor,
        x_self: torch.Tensor | None,
        x_ctrl: torch.Tensor,
        t: torch.Tensor,
        cov: dict,
        uncond: torch.Tensor | None = None,
        only: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """f(x_t, x̂0_self, x_ctrl, t, cov) [B, S, G]; ``uncond`` rows use the null covariate vector; ``x_self``
        None stands for zeros (a first self-conditioning pass).

        ``only`` [B] (bool) computes those sets alone and leaves the others' output zero: sets never see each other,
        so a selected set's output is what the whole batch gives it. The conditioning vector is formed for the whole
        batch first, so label dropout draws what a full pass draws. While torch.compile traces, every set is
        computed (static shapes).
        """
        ds = cov.get("dataset") if self.n_datasets > 1 else None  # (B,) data set of each set
        c = self.condition(t, cov, uncond)  # (B, H)
        if only is None or torch.compiler.is_compiling():
            return self._sets(x_t, x_self, x_ctrl, c, ds)
        rows = only.nonzero().squeeze(1)  # (n,)
        out = x_t.new_zeros(x_t.shape[0], x_t.shape[1], self.n_genes)  # (B, S, G)
        pick = (None if a is None else a[rows] for a in (x_t, x_self, x_ctrl, c, ds))
        out[rows] = self._sets(*pick).to(out.dtype)
        return out

    def _sets(self, x_t, x_self, x_ctrl, c, ds) -> torch.Tensor:
        """The two streams from their inputs and the conditioning vector c [B, H] to the output [B, S, G]."""
        x = self._target_in(x_t, x_self, ds)  # (B, S, H)
        xc = self.ctrl_in(x_ctrl)  # (B, S, H)
        for i, block in enumerate(self.blocks):
            x, xc = block(x, xc, c, last=i == len(self.blocks) - 1)  # (B, S, H) each
        return self.final(x, c, ds)  # (B, S, G)

    def _target_in(self, x_t: torch.Tensor, x_self: torch.Tensor | None, ds: torch.Tensor | None) -> torch.Tensor:
        """The target stream's input layer over [x_t ; x̂0_self] (2G -> H). Without x_self (zeros) only the x_t half
        of the weights is applied: a third of that layer's time on a CPU, and no copy of the concatenation."""
        if x_self is None and self.n_datasets == 1:
            return F.linear(x_t, self.x_in.weight[:, : self.n_genes], self.x_in.bias)
        x_in = torch.cat([x_t, torch.zeros_like(x_t) if x_self is None else x_self], dim=-1)  # (B, S, 2G)
        return self.x_in(x_in, ds) if self.n_datasets > 1 else self.x_in(x_in)


def fresh_io_weights(hidden: int, V: int) -> dict[str, torch.Tensor]:
    """Freshly initialised input/output layers over V genes, drawn as :meth:`Denoiser.initialize_weights` draws them
    (finetuning with ``io_layers="reinit"``)."""
    h = hidden
    x_in, ctrl_in = torch.empty(h, 2 * V), torch.empty(h, V)
    nn.init.xavier_uniform_(x_in)
    nn.init.xavier_uniform_(ctrl_in)
    return {"x_in.weight": x_in, "x_in.bias": torch.zeros(h), "ctrl_in.weight": ctrl_in,
            "ctrl_in.bias": torch.zeros(h), "final.linear.weight": torch.randn(V, h) * 0.02,
            "final.linear.bias": torch.zeros(V)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (frozen buffers such as an external embedding table are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def preset_parameter_counts(n_genes: int = 2000, vocab_sizes: dict | None = None) -> dict[str, int]:
    """Parameter count of every preset in `perturbdiff.config.PRESETS`, built on the meta device."""
    counts = {}
    for name in PRESETS:
        cfg = Config.from_preset(name).model
        with torch.device("meta"):
            model = Denoiser(cfg, n_genes, vocab_sizes or DEFAULT_VOCAB_SIZES)
        counts[name] = count_parameters(model)
    return counts
