"""Finetuning (SPEC §5): a task run whose trunk starts from a marginally pretrained one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from perturbdiff._errors import ConfigError
from perturbdiff._logging import logger
from perturbdiff.config import Config
from perturbdiff.data import Split, Vocab
from perturbdiff.model._perturbdiff import PerturbDiff
from perturbdiff.model._pretrained import Pretrained
from perturbdiff.nn import Denoiser, fresh_io_weights

IO_LAYERS = ("keep", "reinit", "task")
ARCHITECTURE = ("hidden", "depth", "heads", "mlp_ratio", "cov_dim", "qk_norm")


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
    if cfg.codec.kind != pretrained.codec.kind and io_layers != "task":
        raise ConfigError(f"a {cfg.codec.kind} codec task cannot take the pretrained run's {pretrained.codec.kind} "
                          f"input/output layers (io_layers={io_layers!r}): use io_layers='task' (--io-layers task) "
                          "to copy the trunk only")
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
    w = pre.io_weights(d) if io_layers == "keep" else fresh_io_weights(net.cfg.hidden, len(pre.genes))
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
