"""What ``PerturbDiff.from_config`` builds from the data before the network: the perturbation priors' blocks, and
the checks that speak before any training (gene selection, representable test conditions)."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from perturbdiff._logging import is_cli, warn
from perturbdiff.config import Config
from perturbdiff.data import (
    DataKeys,
    PriorBlock,
    Split,
    Vocab,
    build_priors,
    parse_routes,
    read_embedding_table,
    training_shifts,
    unseen_error,
)


def prior_blocks(cfg: Config, adata: AnnData, keys: DataKeys, split: Split, train_rows: np.ndarray) -> list:
    """The configured prior routes' blocks, then the user's table (``model.pert_embedding``) as one more."""
    blocks = []
    routes = parse_routes(cfg.model.pert_prior)
    if routes:
        shifts, parts_of = training_shifts(adata, keys, split.train)
        blocks = build_priors(routes, X=adata.X, rows=train_rows, genes=list(adata.var_names), shifts=shifts,
                              parts_of=parts_of, dim=cfg.model.prior_dim, neighbours=cfg.model.prior_neighbours,
                              seed=cfg.train.seed)
    if cfg.model.pert_embedding:
        names, mat = read_embedding_table(cfg.model.pert_embedding)
        blocks.append(PriorBlock("table", names, mat))
    return blocks


def check_gene_selection(record: dict, n_train: int, n_obs: int) -> None:
    """Warn when the genes were chosen as HVGs of more cells than the split may learn from (test cells
    included: SPEC §1 wants them chosen on training cells only)."""
    sel = record.get("gene_selection") or {}
    n_sel = sel.get("n_train_cells")
    if sel.get("method") == "hvg" and n_sel is not None and int(n_sel) > n_train:
        warn(f"the genes were chosen as HVGs of {n_sel} cells, but this split may learn from {n_train} of the "
             f"{n_obs}: held-out cells shaped the gene selection; preprocess the raw file with this split "
             "(perturbdiff preprocess --split, or preprocess(..., split=)) to choose them on training cells only")


def check_test_representable(vocab: Vocab, split: Split) -> None:
    """Name, before training, every test condition whose perturbation no route can represent."""
    unseen = vocab.unseen_parts([p for _, p in split.test])
    if unseen:
        err = unseen_error(unseen, [c for c in split.test if c[1] in unseen])
        warn(f"known before training: {err.for_cli() if is_cli() else err}")
