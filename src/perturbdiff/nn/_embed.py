"""Conditioning: sinusoidal timestep MLP and the covariate encoder with a learned null vector (SPEC §2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017): [cos(t·f_k) ; sin(t·f_k)], f_k = P^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepEmbedder(nn.Module):
    """MLP(sinusoidal(t)): frequency features -> Linear-SiLU-Linear -> H (DiT TimestepEmbedder)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, H)


class CovariateEncoder(nn.Module):
    """CovEncoder: perturbation(+dose), each context column, batch -> cov_dim; concat; Linear-SiLU-Linear.

    Perturbation combinations are the SUM of their parts' embeddings (index 0 is padding and adds nothing), plus,
    with ``interaction``, a learned pairwise term ``W·Σ_{i<j} e_i ⊙ e_j`` (order-invariant; zero for a single part;
    W starts at zero). `pert_table` [n_pert, E] is an optional frozen prior (zero rows for labels it lacks),
    projected by a Linear E->cov_dim and added to the learned table; in training a part the table covers loses its
    learned embedding with probability `prior_dropout`, so the projection learns to speak for it alone. Rows flagged
    `uncond` get the learned null vector instead (classifier-free guidance, DiT LabelEmbedder). In training mode each
    context label is replaced by index 0 (``<unknown>``) with probability `context_dropout`, so unseen contexts have
    a token.
    """

    def __init__(
        self,
        vocab_sizes: dict,
        cov_dim: int,
        hidden: int,
        *,
        pert_table: torch.Tensor | None = None,
        context_dropout: float = 0.0,
        pert_dropout: float = 0.0,
        combo_dropout: float | None = None,
        batch_dropout: float = 0.0,
        prior_dropout: float = 0.0,
        interaction: bool = False,
        dose_values: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.pert_dropout, self.batch_dropout = float(pert_dropout), float(batch_dropout)
        self.combo_dropout = self.pert_dropout if combo_dropout is None else float(combo_dropout)
        self.prior_dropout = float(prior_dropout)
        contexts = list(vocab_sizes.get("contexts", []))
        self.context_dropout = float(context_dropout)
        self.pert = nn.Embedding(int(vocab_sizes["pert"]), cov_dim)
        self.dose = nn.Embedding(max(int(vocab_sizes.get("dose", 1)), 1), cov_dim)
        self.contexts = nn.ModuleList(nn.Embedding(int(n), cov_dim) for n in contexts)
        self.batch = nn.Embedding(max(int(vocab_sizes.get("batch", 1)), 1), cov_dim)
        if pert_table is not None:
            if pert_table.ndim != 2 or pert_table.shape[0] != int(vocab_sizes["pert"]):
                raise ValueError(f"pert_table must be [n_pert={vocab_sizes['pert']}, E], got {tuple(pert_table.shape)}")
            self.register_buffer("pert_table", pert_table.detach().float().clone())
            self.pert_proj: nn.Linear | None = nn.Linear(pert_table.shape[1], cov_dim)
        else:
            self.pert_table = None
            self.pert_proj = None
        self.dose_mlp: nn.Sequential | None = None
        if dose_values is not None:  # log1p(dose) of each dose index (NaN: no number) and the MLP that reads it
            self.register_buffer("dose_values", torch.tensor(dose_values, dtype=torch.float32))
            self.dose_mlp = nn.Sequential(nn.Linear(1, cov_dim), nn.SiLU(), nn.Linear(cov_dim, cov_dim))
        self.pair: nn.Linear | None = None
        if interaction:
            self.pair = nn.Linear(cov_dim, cov_dim)
            nn.init.zeros_(self.pair.weight)
            nn.init.zeros_(self.pair.bias)
        width = cov_dim * (2 + len(contexts))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(hidden))

    def _pert(self, pert: torch.Tensor) -> torch.Tensor:
        """Sum over parts of (learned + projected frozen) embeddings; padding index 0 masked out.

        In training mode each perturbation part (index > 2) becomes the generic token 2 with probability
        `pert_dropout` (`combo_dropout` for the parts of a row with two or more parts), so a perturbation never seen
        in training can be predicted as "a generic perturbation", alone or beside known parts.
        """
        if pert.ndim == 1:
            pert = pert[:, None]  # (B, P)
        if self.training and max(self.pert_dropout, self.combo_dropout) > 0.0 and self.pert.num_embeddings > 3:
            combo = (pert != 0).sum(1, keepdim=True) > 1  # (B, 1)
            p = torch.where(combo, self.combo_dropout, self.pert_dropout)  # (B, 1)
            drop = (torch.rand(pert.shape, device=pert.device) < p) & (pert > 2)
            pert = pert.masked_fill(drop, 2)
        emb = self.pert(pert)  # (B, P, D)
        if self.pert_proj is not None:
            prior = self.pert_table[pert]  # (B, P, E)
            if self.training and self.prior_dropout > 0.0:
                covered = prior.abs().sum(-1) > 0  # (B, P)
                drop = (torch.rand(pert.shape, device=pert.device) < self.prior_dropout) & covered & (pert > 2)
                emb = emb.masked_fill(drop[..., None], 0.0)
            emb = emb + self.pert_proj(prior)  # (B, P, D)
        emb = emb * (pert != 0).to(emb.dtype)[..., None]  # (B, P, D): padding adds nothing
        total = emb.sum(dim=1)  # (B, D)
        if self.pair is not None:  # Σ_{i<j} e_i ⊙ e_j = ((Σ e)² − Σ e²) / 2
            total = total + self.pair(0.5 * (total * total - (emb * emb).sum(dim=1)))
        return total

    def _drop(self, labels: torch.Tensor, p: float) -> torch.Tensor:
        """In training, replace each label by index 0 (``<unknown>``) with probability ``p``."""
        if not self.training or p <= 0.0 or labels.numel() == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < p
        return labels.masked_fill(drop, 0)

    def _dose(self, cov: dict) -> torch.Tensor:
        """The learned dose token, plus with the continuous encoding MLP(log1p dose): from ``cov["dose_value"]``
        when given (a dose never seen has token 0 and its own number), else the dose index's number. In training a
        numeric dose loses its token with probability ``prior_dropout``, so the MLP learns to place doses alone."""
        index = cov["dose"].reshape(-1)  # (B,)
        if self.dose_mlp is None:
            return self.dose(index)
        value = cov["dose_value"].reshape(-1).float() if "dose_value" in cov else self.dose_values[index]  # (B,)
        has = torch.isfinite(value)
        if self.training and self.prior_dropout > 0.0:
            index = index.masked_fill((torch.rand(index.shape, device=index.device) < self.prior_dropout) & has, 0)
        mlp = self.dose_mlp(torch.where(has, value, torch.zeros_like(value))[:, None])  # (B, D)
        return self.dose(index) + mlp * has[:, None].to(mlp.dtype)

    def forward(self, cov: dict, uncond: torch.Tensor | None = None) -> torch.Tensor:
        pert = self._pert(cov["pert"]) + self._dose(cov)  # (B, D)
        parts = [pert]
        if len(self.contexts):
            context = self._drop(cov["context"].reshape(pert.shape[0], -1), self.context_dropout)  # (B, C)
            parts += [emb(context[:, i]) for i, emb in enumerate(self.contexts)]
        parts.append(self.batch(self._drop(cov["batch"].reshape(-1), self.batch_dropout)))
        h = self.mlp(torch.cat(parts, dim=-1))  # (B, H)
        if uncond is not None:
            h = torch.where(uncond.reshape(-1, 1), self.null.to(h.dtype).expand_as(h), h)
        return h  # (B, H)
