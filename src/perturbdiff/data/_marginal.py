"""Marginal pretraining data (SPEC §5): several data sets, one gene vocabulary, sets of one (data set, context).

Genes are unified by *merge-then-select*: each data set contributes its own top HVGs (its preprocessing record's
genes, or HVGs chosen here), and the vocabulary is their union. A data set's cells are zero-filled on the genes it
lacks, and those genes are excluded from its loss through a per-set gene mask. Targets are the control cells of a data
set with perturbations, or all cells of one without; the control stream is zero and conditioning is context only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch.utils.data import Dataset

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data._codec import ScaleCodec
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._loader import SetBatch
from perturbdiff.data._matrix import as_csr
from perturbdiff.data._preprocess import MODEL_SCALE, get_record, hvg_genes, to_log1p
from perturbdiff.data._sets import cut_sets, split_rows
from perturbdiff.data._validate import check_genes, check_input_kind, check_values

CONTEXT_SEP = " / "  # a context of several columns becomes one token: "value1 / value2"


@dataclass
class MarginalSource:
    """One pretraining data set: the rows used as targets, its genes and a context token per row."""

    name: str
    adata: AnnData  # log1p values on exactly ``genes``, in that order; X may be a lazy (on-disk) row reader
    rows: np.ndarray  # [n] rows of adata used as targets
    genes: list[str]
    contexts: np.ndarray  # [n] context token (str) of each target row
    context_keys: tuple[str, ...]
    cells: str  # "control cells" or "all cells"
    scale: float = MODEL_SCALE  # model space = log1p / scale

    def describe(self) -> dict:
        return {"name": self.name, "genes": self.genes, "context_keys": list(self.context_keys),
                "n_cells": int(len(self.rows)), "cells": self.cells,
                "contexts": sorted(set(self.contexts.tolist()))}


def _context_tokens(obs: pd.DataFrame, context_keys: Sequence[str]) -> np.ndarray:
    """Per-cell context token: the context columns' values joined by CONTEXT_SEP. [N] object array."""
    missing = [k for k in context_keys if k not in obs.columns]
    if missing:
        raise DataError(f"context column {missing[0]!r} not in obs (columns: {', '.join(map(str, obs.columns))})")
    cols = [obs[k].astype(str).to_numpy(dtype=object) for k in context_keys]
    out = cols[0]
    for c in cols[1:]:
        out = out + CONTEXT_SEP + c
    return out


def marginal_source(adata: AnnData, name: str, *, context_keys: Sequence[str] | None = None,
                    input_kind: str | None = None, n_hvg: int = 2000, target_sum: float = 1e4,
                    all_cells: bool = False) -> MarginalSource:
    """A pretraining source from a preprocessed AnnData (its record's genes, its control cells) or a plain one.

    A plain AnnData (no PerturbDiff record: e.g. an atlas without perturbations) needs ``context_keys`` and
    ``input_kind``; it is normalised and log1p-transformed like ``preprocess`` does, its top ``n_hvg`` HVGs are its
    genes, and all its cells are targets. ``all_cells=True`` makes every cell of a preprocessed data set a target,
    perturbed ones included (the paper pools all training cells): never for the task's own data, whose held-out
    perturbed cells would leak into pretraining.
    """
    if "perturbdiff" in adata.uns:
        record = get_record(adata)
        keys = DataKeys.from_dict(record["keys"])
        ctx_keys = tuple(context_keys) if context_keys else keys.context_keys
        genes = [str(g) for g in record["genes"]]
        is_ctrl = adata.obs[keys.pert_key].astype(str).to_numpy() == keys.control_value
        if not is_ctrl.any():
            raise DataError(f"{name}: no control cells ({keys.pert_key!r} == {keys.control_value!r}) to pretrain on")
        if all_cells:
            is_ctrl[:] = True
        rows, cells = np.flatnonzero(is_ctrl), "all cells" if is_ctrl.all() else "control cells"
        if [str(g) for g in adata.var_names] != genes:
            raise DataError(f"{name}: the genes differ from its preprocessing record; re-run perturbdiff preprocess")
        scale = float(record.get("scale", MODEL_SCALE))
    else:
        if not context_keys or input_kind is None:
            raise DataError(f"{name} has no PerturbDiff preprocessing record: give its context columns and input "
                            "kind (--context-keys, --input-kind), or run `perturbdiff preprocess` on it first")
        check_input_kind(input_kind)
        check_genes(adata.var_names)
        check_values(adata.X, input_kind)
        ctx_keys = tuple(context_keys)
        _context_tokens(adata.obs, ctx_keys)  # missing column: clear error before the work
        X = to_log1p(adata.X, input_kind, target_sum)
        genes = hvg_genes(X, adata.var_names, np.ones(adata.n_obs, bool), n_hvg)
        cols = adata.var_names.get_indexer(genes)  # select the genes once, not per batch
        adata = AnnData(X=X[:, cols], obs=adata.obs, var=pd.DataFrame(index=pd.Index(genes)))
        rows, cells = np.arange(adata.n_obs), "all cells"
        scale = MODEL_SCALE
    contexts = _context_tokens(adata.obs.iloc[rows], ctx_keys)
    logger.info("pretraining source %s: %d %s x %d genes, %d contexts", name, len(rows), cells, len(genes),
                len(set(contexts.tolist())))
    return MarginalSource(name, adata, rows, genes, contexts, ctx_keys, cells, scale)


def gene_vocabulary(gene_lists: Sequence[Sequence[str]]) -> list[str]:
    """Merge-then-select: the union of every data set's selected genes, in order of first appearance."""
    seen: dict[str, None] = {}
    for genes in gene_lists:
        seen.update(dict.fromkeys(map(str, genes)))
    return list(seen)


def gene_masks(gene_lists: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """[D, V] bool: which vocabulary genes each data set measures (the others are zero-filled, out of its loss)."""
    index = pd.Index(list(vocab))
    masks = np.zeros((len(gene_lists), len(vocab)), bool)
    for d, genes in enumerate(gene_lists):
        pos = index.get_indexer(list(genes))
        masks[d, pos[pos >= 0]] = True
    return masks


class MarginalSetDataset(Dataset):
    """Sets of S target cells of one (data set, context), in vocabulary space, reshuffled from (seed, epoch).

    A batch holds target [B, S, V] (zero on genes the set's data set lacks), control [B, S, V] = 0, gene_mask [B, V],
    dataset [B], context [B, 1] (token index), pert [B, 1] = 0 (perturbation encoding off), batch/dose [B] = 0,
    pad [B, S] and cond [B] (the unit). Rows are read per data set with one row gather each, so a lazy X works.
    """

    def __init__(self, sources: Sequence[MarginalSource], genes: Sequence[str], context_vocab: Sequence[str], *,
                 set_size: int, seed: int, codec: ScaleCodec | None = None):
        if set_size < 1:
            raise DataError(f"set_size must be >= 1, got {set_size}")
        self.sources, self.set_size, self.seed = list(sources), int(set_size), int(seed)
        self.codec = codec or ScaleCodec(scale=self.sources[0].scale if self.sources else MODEL_SCALE)
        self.n_genes = len(genes)
        vocab = pd.Index(list(genes))
        self.gene_pos = [vocab.get_indexer(s.genes) for s in self.sources]  # [g_d] vocabulary column of each gene
        self.masks = torch.from_numpy(gene_masks([s.genes for s in self.sources], genes)).float()  # (D, V)
        ctx_index = pd.Index(list(context_vocab))
        ds = np.concatenate([np.full(len(s.rows), d, np.int64) for d, s in enumerate(self.sources)])
        tok = ctx_index.get_indexer(np.concatenate([s.contexts for s in self.sources]))
        tok = np.where(tok < 0, 0, tok)  # not in the vocabulary: <unknown>
        self._local = np.concatenate([np.arange(len(s.rows)) for s in self.sources])  # row within its source
        ukey, groups = split_rows(np.arange(len(ds)), ds * len(ctx_index) + tok)
        self.unit_dataset, self.unit_context = ukey // len(ctx_index), ukey % len(ctx_index)
        self._sizes = np.asarray([len(g) for g in groups], np.int64)
        self._flat = np.concatenate([np.zeros(0, np.int64), *groups])
        self._ds = ds
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle, pad and cut every (data set, context) unit into sets of S; shuffle the sets."""
        rng = np.random.default_rng([self.seed, int(epoch), 7])
        rows, pad, unit = cut_sets(rng, self._flat, self._sizes, self.set_size)
        order = rng.permutation(len(rows))
        self._rows, self._pad, self._unit = rows[order], pad[order], unit[order]
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitems__(self, indices: Sequence[int]) -> SetBatch:
        idx = np.asarray(indices, np.int64)
        B, S, V = len(idx), self.set_size, self.n_genes
        rows, unit = self._rows[idx], self._unit[idx]  # (B, S), (B,)
        ds = self.unit_dataset[unit]  # (B,)
        target = torch.zeros(B, S, V)
        out = target.numpy()
        for d in np.unique(ds).tolist():
            sel = np.flatnonzero(ds == d)
            src = self.sources[d]
            X = as_csr(src.adata.X[src.rows[self._local[rows[sel].ravel()]]])  # (n·S, g_d)
            vals = self.codec.to_model(X.toarray().reshape(len(sel), S, -1))
            out[np.ix_(sel, np.arange(S), self.gene_pos[d])] = vals
        zeros = torch.zeros(B, dtype=torch.int64)
        batched = {"target": target, "control": torch.zeros_like(target),
                   "gene_mask": self.masks[torch.from_numpy(ds)], "dataset": torch.from_numpy(ds),
                   "context": torch.from_numpy(self.unit_context[unit].astype(np.int64))[:, None],
                   "pert": zeros[:, None].clone(), "batch": zeros.clone(), "dose": zeros.clone(),
                   "pad": torch.from_numpy(self._pad[idx]), "cond": torch.from_numpy(unit.astype(np.int64))}
        return SetBatch(batched)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).batched.items()}

