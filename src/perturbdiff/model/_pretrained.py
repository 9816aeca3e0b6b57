"""Marginal pretraining and zero-shot prediction (SPEC §5).

``Pretrained.from_sources(cfg, sources).train(...)`` learns unperturbed cells of several data sets conditioned on
context only (per-data-set input/output layers over a merge-then-select gene vocabulary, control stream zero).
``Pretrained.zero_shot(...)`` predicts cells of a context without perturbation labels or control cells, through the
one generation path; ``perturbdiff.finetune`` starts a task run from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import logger
from perturbdiff.config import Config
from perturbdiff.data import (
    CONTEXT_SEP,
    PAD,
    UNKNOWN,
    Condition,
    DataKeys,
    MarginalSetDataset,
    MarginalSource,
    ScaleCodec,
    Split,
    Vocab,
    condition_codes,
    gene_vocabulary,
    get_record,
    nonzero_stats,
)
from perturbdiff.model._generate import (
    cells_to_generate,
    check_counts,
    generate,
    per_condition,
    plan_sets,
    sample_settings,
)
from perturbdiff.model._output import assemble, output_uns, with_real_controls
from perturbdiff.model._run import PRETRAIN, Run, build_network
from perturbdiff.nn import DatasetLinear, Denoiser

#: what pretraining always sets: control stream zero (SPEC §5), and no guidance: a marginal has no perturbation to
#: lean towards or away from (a preset's guidance weight is for the finetuned task)
PRETRAIN_SETTINGS = {"diffusion.p_drop_control": 1.0, "sample.guidance": 0.0}


def pretrain_config(cfg: Config) -> Config:
    """The config with the settings marginal pretraining needs (control stream zero, no guidance)."""
    return cfg.update(PRETRAIN_SETTINGS)


class Pretrained(Run):
    """A marginally pretrained denoiser over a gene vocabulary, with one input/output layer per data set."""

    kind = PRETRAIN

    @staticmethod
    def check_config(cfg: Config) -> Config:
        """``cfg`` if pretraining can use it, else one line naming the setting (checked before any data is read)."""
        if cfg.diffusion.process == "flow" and cfg.diffusion.flow_source == "control":
            raise ConfigError("pretraining has no control cells to start a flow from (the control stream is zero): "
                              "use diffusion.flow_source = 'noise'")
        if cfg.codec.kind != "scale":
            raise ConfigError(f"pretraining works in gene space (codec.kind = 'scale'), not {cfg.codec.kind!r}: a "
                              "latent autoencoder over a pretraining gene vocabulary is not built yet")
        return cfg

    def __init__(self, cfg: Config, network: Denoiser, genes: list[str], datasets: list[dict], vocab: Vocab, codec, *,
                 summary: dict | None = None):
        super().__init__(cfg, network, vocab, codec, summary=summary)
        self.genes, self.datasets = genes, datasets

    # -- construction and training ---------------------------------------------------------------------
    @classmethod
    def from_sources(cls, cfg: Config, sources: Sequence[MarginalSource]) -> Pretrained:
        """Gene vocabulary (union of each source's genes), context tokens, and a fresh per-data-set denoiser."""
        cfg.validate()
        if not sources:
            raise DataError("pretraining needs at least one data set")
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"data set name {dup[0]!r} is given twice; name each data set differently")
        scales = {s.scale for s in sources}
        if len(scales) > 1:
            raise DataError(f"the data sets were preprocessed with different model scales {sorted(scales)}")
        cfg = cls.check_config(pretrain_config(cfg))
        genes = gene_vocabulary([s.genes for s in sources])
        tokens = sorted(set().union(*(set(s.contexts.tolist()) for s in sources)))
        vocab = Vocab(pert=[PAD, "control", UNKNOWN], contexts=[[UNKNOWN, *tokens]], context_keys=["context"])
        torch.manual_seed(cfg.train.seed)
        network = build_network(cfg, len(genes), vocab, n_datasets=len(sources))
        clip_max, levels = _value_stats(sources)
        summary = {"n_genes": len(genes), "n_datasets": len(sources), "n_contexts": len(tokens),
                   "n_cells": int(sum(len(s.rows) for s in sources))}
        logger.info("pretraining vocabulary: %d genes (union of %s), %d contexts", len(genes),
                    " + ".join(f"{s.name} {len(s.genes)}" for s in sources), len(tokens))
        datasets = [s.describe() | {"zero_level": q} for s, q in zip(sources, levels)]
        codec = ScaleCodec(scale=sources[0].scale, clip_max=clip_max, zero_level=min(levels),
                           zero_threshold=cfg.codec.zero_threshold, auto_zero=cfg.codec.auto_zero)
        return cls(cfg, network, genes, datasets, vocab, codec, summary=summary)

    def train(self, sources: Sequence[MarginalSource], max_steps: int | None = None,
              out_dir: str | Path | None = None, *, progress: bool = True, resume: bool = True,
              device: str | torch.device | None = None) -> Pretrained:
        """Denoise sets of each data set's target cells (MSE + ED on its genes only); best = last checkpoint."""
        if [s.name for s in sources] != [d["name"] for d in self.datasets]:
            raise DataError("train() needs the same data sets, in the same order, as from_sources()")
        cfg = self._budget(max_steps)
        dataset = MarginalSetDataset(sources, self.genes, self.vocab.contexts[0], set_size=cfg.data.set_size,
                                     seed=cfg.train.seed, codec=self.codec)
        trainer = self._fit(dataset, max_steps, out_dir, progress=progress, resume=resume, device=device,
                            what=f"pretraining ({len(sources)} data sets)")
        self.network.load_state_dict(trainer.ema.state_dict())
        return self

    def _own_meta(self) -> dict[str, Any]:
        return {"genes": self.genes, "datasets": self.datasets}

    @classmethod
    def _from_meta(cls, cfg, meta, vocab, codec, tensors) -> Pretrained:
        network = build_network(cfg, len(meta["genes"]), vocab, n_datasets=len(meta["datasets"]))
        return cls(cfg, network, [str(g) for g in meta["genes"]], meta["datasets"], vocab, codec,
                   summary=meta.get("summary"))

    @classmethod
    def load(cls, path: str | Path, *, which: str = "best") -> Pretrained:
        """Load a ``perturbdiff pretrain`` run directory or checkpoint (safetensors only, no pickle)."""
        return super().load(path, which=which)

    # -- which data set's layers -----------------------------------------------------------------------
    def dataset_index(self, name: str | None = None, genes: Sequence[str] | None = None) -> int:
        """The data set called ``name``, else the one sharing most genes with ``genes`` (first on ties)."""
        names = [d["name"] for d in self.datasets]
        if name is not None:
            if name not in names:
                raise DataError(f"no pretraining data set {name!r}; the run has {', '.join(map(repr, names))}")
            return names.index(name)
        if genes is None or len(names) == 1:
            return 0
        want = set(map(str, genes))
        overlap = [len(want & set(d["genes"])) for d in self.datasets]
        best = int(np.argmax(overlap))
        logger.info("using the input/output layers of pretraining data set %r (%d of %d genes shared)",
                    names[best], overlap[best], len(want))
        return best

    def io_weights(self, d: int) -> dict[str, torch.Tensor]:
        """Vocabulary-wide layers of data set ``d``: x_in [H, 2V] (+ bias), out [V, H] (+ bias), ctrl_in [H, V]."""
        net = self.network

        def pick(layer: nn.Module, name: str) -> torch.Tensor:
            t = getattr(layer, name).detach()
            return t[d] if isinstance(layer, DatasetLinear) else t

        return {"x_in.weight": pick(net.x_in, "weight"), "x_in.bias": pick(net.x_in, "bias"),
                "final.linear.weight": pick(net.final.linear, "weight"),
                "final.linear.bias": pick(net.final.linear, "bias"),
                "ctrl_in.weight": net.ctrl_in.weight.detach(), "ctrl_in.bias": net.ctrl_in.bias.detach()}

    # -- zero-shot -------------------------------------------------------------------------------------
    def context_tokens(self, conditions: Sequence[Condition]) -> np.ndarray:
        """Token index of each condition's context (0 = <unknown> for a context not seen in pretraining)."""
        index = pd.Index(self.vocab.contexts[0])
        labels = [CONTEXT_SEP.join(c) for c, _ in conditions]
        tok = index.get_indexer(labels)
        unseen = sorted({lab for lab, t in zip(labels, tok) if t <= 0})
        if unseen:
            logger.info("contexts not seen in pretraining (predicted as the <unknown> context): %s", ", ".join(unseen))
        return np.where(tok < 0, 0, tok).astype(np.int64)

    def zero_shot(self, adata: AnnData, conditions: Sequence[Condition] | None = None, *,
                  split: Split | None = None, subset: str = "test", n_cells: int | Sequence[int] | None = None,
                  dataset: str | None = None, n_samples: int = 1, steps: int | None = None,
                  start: str | None = None, solver: str | None = None, seed: int = 0,
                  include_controls: bool = True, progress: bool = True,
                  device: str | torch.device | None = None) -> AnnData:
        """Cells of each condition's context from the pretrained marginal, on ``adata``'s genes (no perturbation
        labels and no control cells used); real control cells are appended when ``adata`` has them."""
        check_counts(n_samples=n_samples, n_cells=n_cells)
        keys = DataKeys.from_dict(get_record(adata)["keys"])
        if conditions is None:
            if split is None:
                raise DataError("zero-shot prediction needs conditions or a split")
            conditions = split.subset(subset)
        conditions = [(tuple(map(str, c)), str(p)) for c, p in conditions]
        if not conditions:
            raise DataError(f"no conditions to predict (subset {subset!r} is empty)")
        code, present = condition_codes(adata, keys)  # once: cell counts per condition, whether controls exist
        real = dict(zip(present, np.bincount(code, minlength=len(present)).tolist()))
        counts = cells_to_generate(n_cells, conditions, split=split, subset=subset,
                                   observed=[real.get(c, 0) for c in conditions])
        missing = [c for c, n in zip(conditions, counts) if n < 1]
        if missing:
            raise DataError(f"no cells of condition {missing[0]!r} in the data to size the prediction: pass n_cells")
        genes = [str(g) for g in adata.var_names]
        d = self.dataset_index(dataset, genes)
        settings = sample_settings(self.cfg.sample, guidance=0.0, steps=steps, start=start, solver=solver)
        plan = plan_sets(counts, self.cfg.data.set_size, n_samples, seed)
        cells = generate(self, plan, self._covariates(self.context_tokens(conditions)[plan.cond], d), settings=settings,
                         n_genes=len(self.genes), seed=seed, device=device, progress=progress,
                         codec=self.codec.with_zero_level(self.datasets[d].get("zero_level", self.codec.zero_level)))
        pos = pd.Index(self.genes).get_indexer(genes)
        if (pos < 0).any():
            logger.warning("%d of %d genes are not in the pretraining vocabulary: predicted as 0", int((pos < 0).sum()),
                           len(genes))
        n = len(conditions)
        parts = [(j % n, j // n, _on_genes(self.codec.from_model(c), pos))
                 for j, c in enumerate(per_condition(cells, plan, counts, n_samples))]
        pred = assemble(parts, conditions, genes, keys.pert_key, keys.context_keys)
        if include_controls and any(p == keys.control_value for _, p in present):
            pred = with_real_controls(pred, adata, keys, {c for c, _ in conditions})
        pred.uns["perturbdiff"] = output_uns(get_record(adata), mode="zero-shot", dataset=self.datasets[d]["name"],
                                             steps=settings.steps, start=settings.start, n_samples=n_samples,
                                             seed=seed)
        return pred

    @staticmethod
    def _covariates(tokens: np.ndarray, d: int) -> dict[str, np.ndarray]:
        """Context-only covariates per set (perturbation, batch and dose off; the data set's layers)."""
        zeros = np.zeros(len(tokens), np.int64)
        return {"pert": zeros[:, None], "context": tokens[:, None], "batch": zeros, "dose": zeros,
                "dataset": np.full(len(tokens), d, np.int64)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_genes": len(self.genes), "datasets": [
            {k: v for k, v in d.items() if k != "genes"} | {"n_genes": len(d["genes"])} for d in self.datasets],
            "contexts": self.vocab.contexts[0][1:]}


def _on_genes(cells: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Vocabulary-space cells [n, V] -> [n, G] on the given genes' positions (-1: not in the vocabulary, 0)."""
    out = np.zeros((len(cells), len(pos)), np.float32)
    out[:, pos >= 0] = cells[:, pos[pos >= 0]]
    return out


def _value_stats(sources: Sequence[MarginalSource]) -> tuple[float | None, list[float]]:
    """clip_max (largest model-space value of any source) and each source's zero level (1st percentile of its
    non-zero log1p values; data sets differ: depth, normalisation), exact and chunked for a store."""
    stats = [nonzero_stats(s.adata.X, s.rows) for s in sources]
    top = max((vmax for vmax, _, nnz in stats if nnz), default=None)
    return (None if top is None else top / sources[0].scale), [q01 if nnz else 0.0 for _, q01, nnz in stats]


