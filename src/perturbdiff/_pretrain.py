"""Marginal pretraining, finetuning and zero-shot prediction (SPEC §5).

``Pretrained.from_sources(cfg, sources).train(...)`` learns unperturbed cells of several data sets conditioned on
context only (per-data-set input/output layers over a merge-then-select gene vocabulary, control stream zero).
``finetune(pretrained, cfg, adata, split, io_layers=...)`` returns a normal :class:`PerturbDiff` whose trunk starts
from the pretrained weights; ``Pretrained.zero_shot(...)`` predicts cells of a context without perturbation labels or
control cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from perturbdiff import __version__
from perturbdiff._errors import CheckpointError, ConfigError, DataError
from perturbdiff._logging import logger
from perturbdiff._model import PerturbDiff, _resolve_checkpoint, default_device, with_sampler
from perturbdiff.config import Config, ModelConfig
from perturbdiff.data import DataKeys, get_record
from perturbdiff.data._marginal import CONTEXT_SEP, MarginalSetDataset, MarginalSource, gene_vocabulary
from perturbdiff.data._split import Condition, Split, condition_codes
from perturbdiff.data._store import nonzero_stats
from perturbdiff.data._vocab import PAD, UNKNOWN, Vocab
from perturbdiff.diffusion import ddim_sample, make_schedule
from perturbdiff.nn import Denoiser
from perturbdiff.nn._block import DatasetLinear
from perturbdiff.predict import assemble, output_uns, with_controls
from perturbdiff.train import Trainer, load_checkpoint
from perturbdiff.train._checkpoint import save_checkpoint, split_prefix
from perturbdiff.train._loop import run_trainer

KIND = "pretrain"
IO_LAYERS = ("keep", "reinit", "task")
ARCHITECTURE = ("hidden", "depth", "heads", "mlp_ratio", "cov_dim", "qk_norm")
#: what pretraining always sets: control stream zero (SPEC §5)
PRETRAIN_SETTINGS = {"diffusion.p_drop_control": 1.0}


def pretrain_config(cfg: Config) -> Config:
    """The config with the settings marginal pretraining needs (control stream zero)."""
    return cfg.update(PRETRAIN_SETTINGS)


class Pretrained:
    """A marginally pretrained denoiser over a gene vocabulary, with one input/output layer per data set."""

    def __init__(self, cfg: Config, network: Denoiser, genes: list[str], datasets: list[dict], vocab: Vocab, *,
                 scale: float, clip_max: float | None, zero_level: float, summary: dict | None = None):
        self.cfg, self.network, self.genes, self.datasets, self.vocab = cfg, network, genes, datasets, vocab
        self.scale, self.clip_max, self.zero_level = float(scale), clip_max, float(zero_level)
        self.summary = summary or {}
        self.sched = make_schedule(cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
        self.trainer: Trainer | None = None

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
        cfg = pretrain_config(cfg)
        genes = gene_vocabulary([s.genes for s in sources])
        tokens = sorted(set().union(*(set(s.contexts.tolist()) for s in sources)))
        vocab = Vocab(pert=[PAD, "control", UNKNOWN], contexts=[[UNKNOWN, *tokens]], context_keys=["context"])
        torch.manual_seed(cfg.train.seed)
        network = Denoiser(cfg.model, len(genes), vocab.sizes, n_datasets=len(sources))
        clip_max, levels = _value_stats(sources)
        summary = {"n_genes": len(genes), "n_datasets": len(sources), "n_contexts": len(tokens),
                   "n_cells": int(sum(len(s.rows) for s in sources))}
        logger.info("pretraining vocabulary: %d genes (union of %s), %d contexts", len(genes),
                    " + ".join(f"{s.name} {len(s.genes)}" for s in sources), len(tokens))
        datasets = [s.describe() | {"zero_level": q} for s, q in zip(sources, levels)]
        return cls(cfg, network, genes, datasets, vocab, scale=sources[0].scale,
                   clip_max=clip_max, zero_level=min(levels), summary=summary)

    def train(self, sources: Sequence[MarginalSource], max_steps: int | None = None,
              out_dir: str | Path | None = None, *, progress: bool = True, resume: bool = True,
              device: str | torch.device | None = None) -> Pretrained:
        """Denoise sets of each data set's target cells (MSE + ED on its genes only); best = last checkpoint."""
        if [s.name for s in sources] != [d["name"] for d in self.datasets]:
            raise DataError("train() needs the same data sets, in the same order, as from_sources()")
        if max_steps and max_steps != self.cfg.train.max_steps:  # the run's budget: the LR schedule ends there
            self.cfg = self.cfg.update({"train": {"max_steps": int(max_steps)}})
        cfg = self.cfg
        dataset = MarginalSetDataset(sources, self.genes, self.vocab.contexts[0], set_size=cfg.data.set_size,
                                     seed=cfg.train.seed, scale=self.scale)
        self.trainer = run_trainer(self.network, cfg, dataset, meta=self._meta, validate=None, out_dir=out_dir,
                                   device=device or default_device(), resume=resume)
        logger.info("pretraining on %d sets/epoch of %d cells (%d data sets), %d parameters", len(dataset),
                    cfg.data.set_size, len(sources), sum(p.numel() for p in self.network.parameters()))
        self.trainer.fit(max_steps, progress=progress)
        self.network.load_state_dict(self.trainer.ema.state_dict())
        return self

    # -- persistence -----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"kind": KIND, "config": self.cfg.to_dict(), "genes": self.genes, "datasets": self.datasets,
                "vocab": self.vocab.to_dict(), "scale": self.scale, "clip_max": self.clip_max,
                "zero_level": self.zero_level, "summary": self.summary,
                "versions": {"perturbdiff": __version__, "torch": torch.__version__}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "model.safetensors"
        return save_checkpoint(path, {f"ema.{k}": v for k, v in self.network.state_dict().items()}, self._meta())

    @classmethod
    def load(cls, path: str | Path, *, which: str = "best") -> Pretrained:
        """Load a ``perturbdiff pretrain`` run directory or checkpoint (safetensors only, no pickle)."""
        path = _resolve_checkpoint(Path(path), which)
        tensors, meta = load_checkpoint(path, prefixes=("ema.",))
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{path} is not a pretraining run (written by `perturbdiff train`?): use "
                                  "PerturbDiff.load / `perturbdiff predict` for it")
        cfg = Config.from_dict(meta["config"])
        vocab = Vocab.from_dict(meta["vocab"])
        network = Denoiser(cfg.model, len(meta["genes"]), vocab.sizes, n_datasets=len(meta["datasets"]))
        try:
            network.load_state_dict(split_prefix(tensors, "ema"))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the recorded model configuration ({e})") from None
        out = cls(cfg, network.eval(), [str(g) for g in meta["genes"]], meta["datasets"], vocab,
                  scale=meta["scale"], clip_max=meta.get("clip_max"), zero_level=meta.get("zero_level", 0.0),
                  summary=meta.get("summary"))
        out.checkpoint_meta = {"state": meta.get("state"), "versions": meta.get("versions")}
        return out

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
                  start: str | None = None, seed: int = 0, include_controls: bool = True, progress: bool = True,
                  device: str | torch.device | None = None) -> AnnData:
        """Cells of each condition's context from the pretrained marginal, on ``adata``'s genes (no perturbation
        labels and no control cells used); real control cells are appended when ``adata`` has them."""
        from perturbdiff._model import check_counts

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
        counts = _n_cells(real, conditions, n_cells, split, subset)
        genes = [str(g) for g in adata.var_names]
        d = self.dataset_index(dataset, genes)
        dcfg = with_sampler(self.cfg.diffusion, sampler_steps=steps, sampler_start=start)
        tok = self.context_tokens(conditions)
        parts = []
        for k in range(n_samples):
            cells = self._generate(tok, counts, d, dcfg, seed=seed * 1009 + k, device=device, progress=progress)
            parts += [(i, k, c) for i, c in enumerate(cells)]
        pos = pd.Index(self.genes).get_indexer(genes)
        if (pos < 0).any():
            logger.warning("%d of %d genes are not in the pretraining vocabulary: predicted as 0", int((pos < 0).sum()),
                           len(genes))
        parts = [(i, k, _on_genes(c, pos)) for i, k, c in parts]
        pred = assemble(parts, conditions, genes, keys, scale=self.scale)
        if include_controls and any(p == keys.control_value for _, p in present):
            pred = with_controls(pred, adata, keys, {c for c, _ in conditions})
        pred.uns["perturbdiff"] = output_uns(get_record(adata), mode="zero-shot", dataset=self.datasets[d]["name"],
                                             steps=dcfg.sampler_steps, start=dcfg.sampler_start,
                                             n_samples=n_samples, seed=seed)
        return pred

    def _generate(self, tok: np.ndarray, counts: Sequence[int], d: int, dcfg, *, seed: int, device,
                  progress: bool, batch_size: int = 64) -> list[np.ndarray]:
        """Model-space cells [n_i, V] per condition: DDIM with a zero control stream, context-only covariates."""
        S, V = self.cfg.data.set_size, len(self.genes)
        cond = np.repeat(np.arange(len(counts)), [math.ceil(n / S) for n in counts])  # (N,)
        device = torch.device(device or default_device())
        net = self.network.to(device).eval()
        level = self.datasets[d].get("zero_level", self.zero_level)  # the data set whose output layer speaks
        auto = 0.5 * level / self.scale if dcfg.auto_zero else 0.0
        out = np.zeros((len(cond), S, V), np.float32)
        for c in range(0, len(cond), batch_size):
            sl = slice(c, min(c + batch_size, len(cond)))
            b = sl.stop - sl.start
            zeros = torch.zeros(b, dtype=torch.int64, device=device)
            cov = {"pert": zeros[:, None], "context": torch.from_numpy(tok[cond[sl]])[:, None].to(device),
                   "batch": zeros, "dose": zeros, "dataset": torch.full((b,), d, dtype=torch.int64, device=device)}
            gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + c)
            x0 = ddim_sample(net, self.sched, torch.zeros(b, S, V, device=device), cov, steps=dcfg.sampler_steps,
                             guidance=dcfg.guidance, start=dcfg.sampler_start,
                             truncated_start_t=dcfg.truncated_start_t, generator=gen,
                             zero_threshold=max(dcfg.zero_threshold, auto), clip_max=self.clip_max,
                             progress=progress and c == 0)
            out[sl] = x0.float().cpu().numpy()
        return [out[cond == i].reshape(-1, V)[:n] for i, n in enumerate(counts)]

    def info(self) -> dict[str, Any]:
        return {"kind": KIND, "n_genes": len(self.genes), "datasets": [
            {k: v for k, v in d.items() if k != "genes"} | {"n_genes": len(d["genes"])} for d in self.datasets],
            "contexts": self.vocab.contexts[0][1:], "summary": self.summary, "config": self.cfg.to_dict(),
            **getattr(self, "checkpoint_meta", {})}


def _on_genes(cells: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Vocabulary-space cells [n, V] -> [n, G] on the given genes' positions (-1: not in the vocabulary, 0)."""
    out = np.zeros((len(cells), len(pos)), np.float32)
    out[:, pos >= 0] = cells[:, pos[pos >= 0]]
    return out


def _n_cells(real: dict, conditions, n_cells, split, subset) -> list[int]:
    """Given, the split's test_n_cells, or the real count of each condition (``real``: condition -> cells)."""
    if isinstance(n_cells, (int, np.integer)):
        return [int(n_cells)] * len(conditions)
    if n_cells is not None:
        return [int(n) for n in n_cells]
    if split is not None and subset == "test" and split.test_n_cells and list(conditions) == list(split.test):
        return list(split.test_n_cells)
    missing = [c for c in conditions if not real.get(c)]
    if missing:
        raise DataError(f"no cells of condition {missing[0]!r} in the data to size the prediction: pass n_cells")
    return [real[c] for c in conditions]


def _value_stats(sources: Sequence[MarginalSource]) -> tuple[float | None, list[float]]:
    """clip_max (largest model-space value of any source) and each source's zero level (1st percentile of its
    non-zero log1p values; data sets differ: depth, normalisation), exact and chunked for a store."""
    stats = [nonzero_stats(s.adata.X, s.rows) for s in sources]
    top = max((vmax for vmax, _, nnz in stats if nnz), default=None)
    return (None if top is None else top / sources[0].scale), [q01 if nnz else 0.0 for _, q01, nnz in stats]


# -- finetuning ---------------------------------------------------------------------------------------------
def finetune(pretrained: Pretrained, cfg: Config, adata: AnnData, split: Split, *, io_layers: str = "keep",
             dataset: str | None = None) -> PerturbDiff:
    """A PerturbDiff for the task whose trunk starts from ``pretrained`` (SPEC §5).

    Copied: timestep MLP, transformer blocks, the null (guidance) vector, and, for a task with one context column,
    the covariate MLP and the embeddings of contexts seen in pretraining. Re-initialised: the final layer's
    modulation and the perturbation encoder (perturbation, dose and batch embeddings). Input/output layers:
    ``keep`` the chosen data set's vocabulary-wide layers (restricted to the task's genes), ``reinit`` fresh
    vocabulary-wide layers, ``task`` fresh layers of the task's own genes. The architecture is the pretrained one.
    """
    if io_layers not in IO_LAYERS:
        raise ConfigError(f"io_layers must be one of {', '.join(IO_LAYERS)}, got {io_layers!r}")
    arch = {f"model.{k}": getattr(pretrained.cfg.model, k) for k in ARCHITECTURE}
    changed = [k for k, v in arch.items() if getattr(cfg.model, k.split(".", 1)[1]) != v]
    if changed:
        logger.info("finetuning keeps the pretrained architecture (%s)", ", ".join(f"{k}={arch[k]}" for k in changed))
    cfg = cfg.update(arch)
    model = PerturbDiff.from_config(cfg, adata, split)
    d = pretrained.dataset_index(dataset, model.genes)
    done = transfer_weights(model.network, pretrained, model.genes, model.vocab, io_layers=io_layers, dataset=d)
    model.summary["pretrained"] = {"io_layers": io_layers, "dataset": pretrained.datasets[d]["name"], **done}
    return model


def transfer_weights(net: Denoiser, pre: Pretrained, genes: Sequence[str], vocab: Vocab, *, io_layers: str,
                     dataset: int) -> dict[str, Any]:
    """Copy the pretrained trunk into a fresh task network in place; returns what was copied (for the summary)."""
    src = pre.network.state_dict()
    params = dict(net.named_parameters())
    copied = []
    with torch.no_grad():
        for name, p in params.items():
            if name.startswith(("t_embed.", "blocks.")) or name == "cov_encoder.null":
                p.copy_(src[name])
                copied.append(name)
        n_ctx = _copy_contexts(net, pre, vocab, src)
        pos = pd.Index(pre.genes).get_indexer(list(genes))
        if io_layers != "task":
            _set_io_layers(net, pre, pos, io_layers, dataset)
    n_in = int((pos >= 0).sum())
    logger.info("finetuning from pretrained weights: trunk copied, %d of %d contexts matched, io layers %s "
                "(%d of %d genes in the pretraining vocabulary)", n_ctx, len(vocab.contexts[0]) - 1 if vocab.contexts
                else 0, io_layers, n_in, len(genes))
    return {"n_copied_tensors": len(copied), "n_contexts_matched": n_ctx, "n_genes_in_vocabulary": n_in}


def _copy_contexts(net: Denoiser, pre: Pretrained, vocab: Vocab, src: dict) -> int:
    """Covariate MLP + embeddings of contexts known to pretraining, when the task has one context column."""
    enc = net.cov_encoder
    if len(vocab.contexts) != 1 or enc.mlp[0].weight.shape != src["cov_encoder.mlp.0.weight"].shape:
        logger.info("the task has %d context columns: context embeddings and covariate MLP start fresh",
                    len(vocab.contexts))
        return 0
    for i in (0, 2):
        enc.mlp[i].weight.copy_(src[f"cov_encoder.mlp.{i}.weight"])
        enc.mlp[i].bias.copy_(src[f"cov_encoder.mlp.{i}.bias"])
    pos = pd.Index(pre.vocab.contexts[0]).get_indexer(vocab.contexts[0])
    pos[0] = 0  # <unknown> ↔ <unknown>
    hit = np.flatnonzero(pos >= 0)
    emb = enc.contexts[0].weight
    emb[torch.from_numpy(hit)] = src["cov_encoder.contexts.0.weight"][torch.from_numpy(pos[hit])]
    return int(len(hit) - 1)


def _set_io_layers(net: Denoiser, pre: Pretrained, pos: np.ndarray, io_layers: str, d: int) -> None:
    """Input/output layers of the task's genes from the vocabulary-wide ones (pretrained or fresh).

    A vocabulary-wide layer on zero-filled inputs, with the outputs of other genes masked out of the loss, computes
    exactly what its task-gene columns/rows compute, so only those are kept. Task genes outside the vocabulary keep
    their fresh initialisation.
    """
    w = pre.io_weights(d) if io_layers == "keep" else _fresh_vocab_layers(net.cfg, len(pre.genes))
    G, V = len(pos), len(pre.genes)
    have = torch.from_numpy(np.flatnonzero(pos >= 0))
    src = torch.from_numpy(pos[pos >= 0])
    net.x_in.weight[:, have] = w["x_in.weight"][:, src]
    net.x_in.weight[:, G + have] = w["x_in.weight"][:, V + src]
    net.x_in.bias.copy_(w["x_in.bias"])
    net.ctrl_in.weight[:, have] = w["ctrl_in.weight"][:, src]
    net.ctrl_in.bias.copy_(w["ctrl_in.bias"])
    net.final.linear.weight[have] = w["final.linear.weight"][src]
    net.final.linear.bias[have] = w["final.linear.bias"][src]


def _fresh_vocab_layers(mcfg: ModelConfig, V: int) -> dict[str, torch.Tensor]:
    """Freshly initialised vocabulary-wide input/output layers (the denoiser's own initialisation)."""
    h = mcfg.hidden
    x_in, ctrl_in = torch.empty(h, 2 * V), torch.empty(h, V)
    nn.init.xavier_uniform_(x_in)
    nn.init.xavier_uniform_(ctrl_in)
    return {"x_in.weight": x_in, "x_in.bias": torch.zeros(h), "ctrl_in.weight": ctrl_in,
            "ctrl_in.bias": torch.zeros(h), "final.linear.weight": torch.randn(V, h) * 0.02,
            "final.linear.bias": torch.zeros(V)}


def is_pretrained_run(path: str | Path, which: str = "best") -> bool:
    """Whether ``path`` (a run directory or checkpoint) was written by ``perturbdiff pretrain``."""
    try:
        ckpt = _resolve_checkpoint(Path(path), which)
        _, meta = load_checkpoint(ckpt, prefixes=("__none__",))
    except CheckpointError:
        return False
    return meta.get("kind") == KIND
