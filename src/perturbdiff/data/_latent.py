"""The latent codec (``codec.kind = "latent"``, dbDiffusion): an autoencoder fitted on the run's training cells turns
each log1p cell into a D-dimensional latent cell, the process generates sets of latent cells, and the decoder turns
them back into log1p cells with a zero model (docs/DESIGN.md, "Codecs").

Encoder: genes → ``hidden`` (``depth`` layers, LayerNorm + SiLU) → D; the latent is standardised per dimension on the
training cells, so the process sees unit-scale values whatever D is. Decoder: D → ``hidden`` → per gene a value
(softplus, the log1p level when the gene is detected) and a detection logit. It is trained as a hurdle model:
binary cross-entropy on detection plus squared error of the value on the detected entries. Decoding draws each
gene's zero from its detection probability (``zeros = "sample"``, seeded), so generated cells carry zeros at the
data's rate; ``"mean"`` writes the expected value p·v instead (no zeros), ``"threshold"`` keeps v where p > 0.5.

The weights live in the run's checkpoint as tensors ``codec.*`` (safetensors, never pickled); settings and the
reconstruction quality measured on held-out training cells are JSON in its header.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from perturbdiff._errors import CheckpointError, DataError
from perturbdiff._logging import logger
from perturbdiff.data._matrix import row_reader


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """genes → standardised latent → (value, detection logit) per gene; ``mean``/``std`` are the latent's
    standardisation (buffers, set after fitting)."""

    def __init__(self, n_genes: int, dim: int, hidden: int, depth: int):
        super().__init__()
        self.encoder = _mlp([n_genes] + [hidden] * depth + [dim])
        self.decoder = _mlp([dim] + [hidden] * depth + [2 * n_genes])
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.encoder(x) - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, logit = self.decoder(z * self.std + self.mean).chunk(2, dim=-1)
        return F.softplus(value), logit


def hurdle_loss(value: torch.Tensor, logit: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Detection BCE + squared error of the value where the gene is detected (x in log1p)."""
    hit = x > 0
    bce = F.binary_cross_entropy_with_logits(logit, hit.float())
    mse = ((value - x).square() * hit).sum() / hit.sum().clamp_min(1)
    return bce + mse, {"bce": float(bce.detach()), "mse": float(mse.detach())}


@dataclass
class LatentCodec:
    """Autoencoder settings, its weights (``net``, None until fitted) and what fitting measured (``quality``)."""

    kind: ClassVar[str] = "latent"
    nonnegative: ClassVar[bool] = False  # latent values are signed; the decoder's softplus keeps genes >= 0
    in_place: ClassVar[bool] = False  # a latent cell is narrower than its genes: to_model returns a new array

    n_genes: int  # the settings (defaults: config.CodecConfig, the one place they live)
    dim: int
    hidden: int
    depth: int
    steps: int
    batch: int
    lr: float
    zeros: str
    seed: int
    bound: float | None = None  # |latent| bound seen on training cells, widened by 50 % (applied to every x̂0)
    quality: dict[str, float] = field(default_factory=dict)
    net: Autoencoder | None = field(default=None, repr=False, compare=False)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, n_genes: int, cfg, *, seed: int = 0) -> LatentCodec:
        """Settings from a CodecConfig; not fitted yet (training fits it, or a run being resumed provides it)."""
        return cls(n_genes=int(n_genes), dim=cfg.latent_dim, hidden=cfg.latent_hidden, depth=cfg.latent_depth,
                   steps=cfg.latent_steps, batch=cfg.latent_batch, lr=cfg.latent_lr, zeros=cfg.zeros, seed=int(seed))

    @property
    def fitted(self) -> bool:
        return self.net is not None

    def width(self, n_genes: int) -> int:
        """Model-space width: the latent size, whatever the number of genes."""
        return self.dim

    def fit(self, X, rows: np.ndarray, *, progress: bool = False, device=None) -> LatentCodec:
        """Train the autoencoder on cells ``rows`` of X (log1p; in memory or a store), 5 % of them (at most 2,000)
        held out to measure the reconstruction; returns the fitted codec (on the CPU). The global random state is
        untouched."""
        from tqdm.auto import tqdm

        rows = np.asarray(rows, np.int64)
        if len(rows) < 2:
            raise DataError(f"the latent codec needs training cells to fit its autoencoder, got {len(rows)}")
        X = row_reader(X)
        if X.shape[1] != self.n_genes:
            raise DataError(f"the latent codec was set up for {self.n_genes} genes, the data have {X.shape[1]}")
        rng = np.random.default_rng([self.seed, 7])
        rows = rng.permutation(rows)
        n_held = min(2000, max(1, len(rows) // 20))
        held, fit_rows = rows[:n_held], rows[n_held:] if len(rows) > n_held else rows
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = Autoencoder(self.n_genes, self.dim, self.hidden, self.depth).to(device)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-4)
            # one cycle, 5 % warm-up (at least 2 steps: a shorter first phase divides by zero in torch)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.steps,
                                                        pct_start=max(0.05, 2.0 / self.steps))
            net.train()
            order, pos = rng.permutation(fit_rows), 0
            bar = tqdm(range(self.steps), disable=not progress, desc="autoencoder", unit="step", dynamic_ncols=True)
            for _ in bar:
                if pos + self.batch > len(order):
                    order, pos = rng.permutation(fit_rows), 0
                x = torch.from_numpy(X[np.sort(order[pos:pos + self.batch])].toarray().astype(np.float32)).to(device)
                pos += self.batch
                loss, parts = hurdle_loss(*net.decode(net.encoder(x)), x)  # mean/std are still 0/1 here
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(bce=f"{parts['bce']:.3f}", mse=f"{parts['mse']:.3f}", refresh=False)
            net = net.cpu().eval()
            codec = LatentCodec(**self.settings(), net=net)
            sub = fit_rows[: 20 * self.batch]  # encoded while mean / std are still 0 / 1: the raw latent
            z = np.concatenate([codec.to_model(X[sub[i:i + 4096]].toarray()) for i in range(0, len(sub), 4096)])
            z = z.astype(np.float64)
            net.mean.copy_(torch.from_numpy(z.mean(0)))
            net.std.copy_(torch.from_numpy(z.std(0) + 1e-6))
            zs = (z - z.mean(0)) / (z.std(0) + 1e-6)
            codec.bound = float(1.5 * np.abs(zs).max())
            codec.quality = codec.reconstruction(X[np.sort(held)].toarray().astype(np.float32))
        logger.info("latent codec: %d genes -> %d dimensions, held-out reconstruction r=%.3f, zero rate %.3f "
                    "(data %.3f)", self.n_genes, self.dim, codec.quality["cell_pearson"],
                    codec.quality["zero_rate_decoded"], codec.quality["zero_rate_data"])
        return codec

    def settings(self) -> dict[str, Any]:
        """What the autoencoder was configured with (not what fitting produced)."""
        keys = ("n_genes", "dim", "hidden", "depth", "steps", "batch", "lr", "zeros", "seed")
        return {k: getattr(self, k) for k in keys}

    def _need(self) -> Autoencoder:
        if self.net is None:
            raise CheckpointError("the latent codec has not been fitted (train the model first)")
        return self.net

    @torch.no_grad()
    def reconstruction(self, x: np.ndarray) -> dict[str, float]:
        """How well held-out cells x (log1p) come back: per-cell Pearson r of the expected value (mean over cells),
        the per-gene mean's r, and the zero rate of sampled decodes against the data's."""
        value, p = self._decode_parts(self.to_model(x))
        expect = value * p
        xc, ec = x - x.mean(1, keepdims=True), expect - expect.mean(1, keepdims=True)
        r = (xc * ec).sum(1) / np.sqrt((xc ** 2).sum(1) * (ec ** 2).sum(1) + 1e-12)
        sampled = np.where(np.random.default_rng(0).random(p.shape) < p, value, 0.0)
        return {"cell_pearson": float(np.mean(r)),
                "gene_mean_pearson": float(np.corrcoef(x.mean(0), expect.mean(0))[0, 1]),
                "mse": float(np.mean((expect - x) ** 2)),
                "zero_rate_data": float(np.mean(x == 0)), "zero_rate_decoded": float(np.mean(sampled == 0)),
                "n_cells": int(len(x))}

    # -- gene space -> model space -----------------------------------------------------------------------------
    @torch.no_grad()
    def to_model(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """log1p cells [n, G] (dense float32) as standardised latent cells [n, D]; ``out`` is ignored (a latent
        cell does not fit in its gene-space buffer)."""
        net = self._need()
        x = np.asarray(x, np.float32)
        flat = x.reshape(-1, x.shape[-1])
        z = np.concatenate([net.encode(torch.from_numpy(flat[i:i + 8192])).numpy()
                            for i in range(0, len(flat), 8192)]) if len(flat) else np.zeros((0, self.dim), np.float32)
        return z.reshape(*x.shape[:-1], self.dim)

    # -- what a process may generate ---------------------------------------------------------------------------
    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Latent values bounded by 1.5× the largest |value| of the training cells: the decoder is not asked to
        extrapolate far."""
        return x if self.bound is None else x.clamp(-self.bound, self.bound)

    def floor(self) -> float:
        return 0.0

    def zero_floor(self, x: torch.Tensor) -> torch.Tensor:
        """Nothing to floor in latent space: zeros come from the decoder's zero model."""
        return x

    # -- model space -> gene space -----------------------------------------------------------------------------
    @torch.no_grad()
    def _decode_parts(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net = self._need()
        vals, probs = [], []
        for i in range(0, len(z), 8192):
            v, logit = net.decode(torch.from_numpy(np.asarray(z[i:i + 8192], np.float32)))
            vals.append(v.numpy())
            probs.append(torch.sigmoid(logit).numpy())
        if not vals:
            return np.zeros((0, self.n_genes), np.float32), np.zeros((0, self.n_genes), np.float32)
        return np.concatenate(vals), np.concatenate(probs)

    def from_model(self, z: np.ndarray, seed: int | tuple = 0) -> np.ndarray:
        """Latent cells [n, D] as log1p cells [n, G] with the configured zero model (``sample`` draws zeros with
        the generator seeded by ``seed``), decoded 8,192 cells at a time (memory: a few blocks of 8,192 × G)."""
        out = np.empty((len(z), self.n_genes), np.float32)
        rng = np.random.default_rng(seed)
        for i in range(0, len(z), 8192):
            value, p = self._decode_parts(z[i:i + 8192])
            if self.zeros == "mean":
                out[i:i + 8192] = value * p
            elif self.zeros == "threshold":
                out[i:i + 8192] = np.where(p > 0.5, value, 0.0)
            else:
                out[i:i + 8192] = np.where(rng.random(p.shape, dtype=np.float32) < p, value, 0.0)
        return out

    # -- variants and persistence ------------------------------------------------------------------------------
    def with_zero_level(self, level: float) -> LatentCodec:
        return self

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "net"}
        return {"kind": self.kind, **d, "fitted": self.fitted}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The autoencoder's weights for the checkpoint (saved under ``codec.``)."""
        return {} if self.net is None else dict(self._need().state_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> LatentCodec:
        codec = cls(**{k: v for k, v in d.items() if k not in ("kind", "fitted")})
        if d.get("fitted"):
            if not tensors:
                raise CheckpointError("the checkpoint's latent codec has no weights (codec.* tensors)")
            net = Autoencoder(codec.n_genes, codec.dim, codec.hidden, codec.depth)
            try:
                net.load_state_dict(tensors)
            except RuntimeError as e:
                raise CheckpointError(f"the latent codec's weights do not fit its recorded settings ({e})") from None
            codec.net = net.eval()
        return codec
