"""The model-space codec: how gene-space cells (log1p) become what a process generates, and back (docs/DESIGN.md).

``ScaleCodec`` (``codec.kind = "scale"``) divides log1p by the record's scale, bounds generated values by the
largest training value and zeroes those below a floor (the configured threshold, or half the lowest real non-zero
level): generated cells otherwise carry many small values real cells never have (SPEC §8). It is fitted on the
training cells, saved with the run, and is the only place that knows the model space. ``LatentCodec``
(``codec.kind = "latent"``, data/_latent.py) is the second: an autoencoder's latent, with the same methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from perturbdiff.data._latent import LatentCodec
from perturbdiff.data._preprocess import MODEL_SCALE


@dataclass(frozen=True)
class ScaleCodec:
    """log1p / scale, non-negative; ``clip_max`` in model space, ``zero_level`` in log1p."""

    kind: ClassVar[str] = "scale"
    nonnegative: ClassVar[bool] = True  # the process keeps generated values >= 0

    scale: float = MODEL_SCALE
    clip_max: float | None = None
    zero_level: float = 0.0
    zero_threshold: float = 1e-4
    auto_zero: bool = True

    @classmethod
    def fit(cls, X, rows: np.ndarray, *, scale: float = MODEL_SCALE, cfg=None) -> ScaleCodec:
        """Bounds from the training cells ``rows`` of X (in memory or a store, chunked); settings from ``cfg``
        (a CodecConfig)."""
        from perturbdiff.data._store import nonzero_stats

        vmax, q01, nnz = nonzero_stats(X, rows)
        return cls(scale=float(scale), clip_max=vmax / float(scale) if nnz else None,
                   zero_level=q01 if nnz else 0.0, **_settings(cfg))

    fitted: ClassVar[bool] = True
    in_place: ClassVar[bool] = True  # to_model writes into a gene-space buffer (out=x)

    def width(self, n_genes: int) -> int:
        """Model-space width: one value per gene."""
        return int(n_genes)

    # -- gene space -> model space -----------------------------------------------------------------------------
    def to_model(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """log1p cells (dense float32) in model space; in place with ``out=x``."""
        return np.divide(x, np.float32(self.scale), out=out)

    # -- what a process may generate ---------------------------------------------------------------------------
    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space values bounded by the largest training value (applied to every x̂0 while sampling)."""
        return x if self.clip_max is None else x.clamp_max(self.clip_max)

    def floor(self) -> float:
        """Model-space values below this become 0: the configured threshold, or half the lowest real level."""
        auto = 0.5 * self.zero_level / self.scale if self.auto_zero else 0.0
        return max(self.zero_threshold, auto)

    def zero_floor(self, x: torch.Tensor) -> torch.Tensor:
        """Generated model-space cells with the values under :meth:`floor` set to 0."""
        return x.masked_fill(x < self.floor(), 0.0)

    # -- model space -> gene space -----------------------------------------------------------------------------
    def from_model(self, x: np.ndarray, seed: int | tuple = 0) -> np.ndarray:
        """Model-space cells (float32) in log1p (``seed``: unused, the latent codec draws its zeros with it)."""
        return x * np.float32(self.scale)

    # -- variants and persistence ------------------------------------------------------------------------------
    def with_zero_level(self, level: float) -> ScaleCodec:
        """The same codec with another data set's zero level (pretraining: one per data set)."""
        return replace(self, zero_level=float(level))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Nothing beyond the header: the scale codec is a few numbers."""
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> ScaleCodec:
        return cls(**{k: v for k, v in d.items() if k != "kind"})


#: codec kind (``codec.kind``) -> class; a new codec is one file in data/ and one entry here
CODECS: dict[str, type] = {"scale": ScaleCodec, "latent": LatentCodec}


def new_codec(cfg, X, rows: np.ndarray, *, scale: float = MODEL_SCALE, seed: int = 0):
    """The configured codec (a CodecConfig) for a new run: the scale codec fitted on the training cells ``rows``
    of X now; the latent codec set up unfitted (training fits its autoencoder, or takes it from the run it
    resumes)."""
    if cfg is not None and cfg.kind == "latent":
        return LatentCodec.from_config(X.shape[1], cfg, seed=seed)
    return ScaleCodec.fit(X, rows, scale=scale, cfg=cfg)


def _settings(cfg) -> dict[str, Any]:
    return {} if cfg is None else {"zero_threshold": cfg.zero_threshold, "auto_zero": cfg.auto_zero}


def codec_from_meta(meta: dict[str, Any], cfg=None, tensors: dict[str, torch.Tensor] | None = None):
    """The codec a checkpoint holds (its weights, if any, are the ``codec.*`` ``tensors``); checkpoints written
    before codecs existed kept its parts at the top level."""
    if "codec" in meta:
        d = dict(meta["codec"])
        prefix = "codec."
        own = {k[len(prefix):]: v for k, v in (tensors or {}).items() if k.startswith(prefix)}
        return CODECS[d.get("kind", "scale")].from_dict(d, own)
    scale = meta.get("scale", (meta.get("record") or {}).get("scale", MODEL_SCALE))
    return ScaleCodec(scale=float(scale), clip_max=meta.get("clip_max"), zero_level=float(meta.get("zero_level", 0.0)),
                      **_settings(cfg))
