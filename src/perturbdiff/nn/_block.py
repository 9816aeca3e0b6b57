"""The two-stream MM-DiT block (Esser et al. 2024) with AdaLN-Zero (Peebles & Xie 2023), SPEC §2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation x·(1 + scale) + shift, broadcast over the cell axis."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, S, H)


class JointAttention(nn.Module):
    """Multi-head self-attention over cells of the feature-concatenated streams; per-head q/k LayerNorm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads)  # (B, S, 3, nh, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, S, hd)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, S, hd)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))  # (B, S, 2H)


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        inner = int(dim * ratio)
        self.fc1 = nn.Linear(dim, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamModulation(nn.Module):
    """Per-stream parameters: two affine-free LayerNorms, an AdaLN-Zero modulation (6 chunks) and the MLP."""

    def __init__(self, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.mlp = Mlp(hidden, mlp_ratio)


class TwoStreamBlock(nn.Module):
    """MM-DiT block: joint attention on [mod(LN(x)) ; mod(LN(xc))] (2H per cell), then each stream's own MLP.

    Each residual update is multiplied by a gate from c; zero modulation makes the block the identity.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.target = StreamModulation(hidden, mlp_ratio)
        self.control = StreamModulation(hidden, mlp_ratio)
        self.attn = JointAttention(2 * hidden, heads, qk_norm)

    def forward(self, x: torch.Tensor, xc: torch.Tensor, c: torch.Tensor, *,
                last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams after the block; with ``last`` the control stream's MLP, whose output no one reads, is
        skipped (the target stream is the same to the bit)."""
        mod_x = self.target.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (B, H)
        mod_c = self.control.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (B, H)
        hx = modulate(self.target.norm1(x), mod_x[0], mod_x[1])  # (B, S, H)
        hc = modulate(self.control.norm1(xc), mod_c[0], mod_c[1])  # (B, S, H)
        ax, ac = self.attn(torch.cat([hx, hc], dim=-1)).split(self.hidden, dim=-1)  # 2 × (B, S, H)
        x = x + mod_x[2][:, None] * ax
        xc = xc + mod_c[2][:, None] * ac
        x = x + mod_x[5][:, None] * self.target.mlp(modulate(self.target.norm2(x), mod_x[3], mod_x[4]))
        if not last:
            xc = xc + mod_c[5][:, None] * self.control.mlp(modulate(self.control.norm2(xc), mod_c[3], mod_c[4]))
        return x, xc  # (B, S, H) each


class FinalLayer(nn.Module):
    """DiT final layer: AdaLN (shift, scale) on an affine-free LayerNorm, then Linear H -> G (always fp32)."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, dataset: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (B, H)
        h = modulate(self.norm(x), shift, scale)  # (B, S, H)
        # fp32 head: bf16 would quantise x̂0 to ~3 digits, and ε = (x_t − √ᾱ·x̂0)/√(1−ᾱ) amplifies that at small t
        with torch.autocast(device_type=h.device.type, enabled=False):
            if isinstance(self.linear, DatasetLinear):
                return self.linear(h.float(), dataset)  # (B, S, G)
            return self.linear(h.float())  # (B, S, G)


class DatasetLinear(nn.Module):
    """One Linear per data set (marginal pretraining, SPEC §5): y_b = x_b W[d_b]ᵀ + b[d_b] for set b of data set d_b.

    ``weight`` [D, out, in] and ``bias`` [D, out]; each set's weights are gathered and applied by one batched matmul.
    """

    def __init__(self, n_datasets: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_datasets, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n_datasets, out_features))
        for w in self.weight:
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor, dataset: torch.Tensor | None) -> torch.Tensor:
        if dataset is None:
            raise ValueError("a per-data-set layer needs the data set index of every set (cov['dataset'])")
        w, b = self.weight[dataset.reshape(-1)], self.bias[dataset.reshape(-1)]  # (B, out, in), (B, out)
        return torch.baddbmm(b[:, None].to(x.dtype), x, w.transpose(1, 2).to(x.dtype))  # (B, S, out)
