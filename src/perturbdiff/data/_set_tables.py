"""Per-unit tables of the cell-set data set, built once before training: the anchor's offsets with dropped parts
(``model.anchor_unseen``) and the set-mean term's gene weights (``diffusion.mean_de_weight``); and the cells each
validation condition is scored on (``train.val_cells``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from perturbdiff._errors import DataError
from perturbdiff.data._matrix import group_means
from perturbdiff.data._split import Condition
from perturbdiff.data._vocab import FIRST_LABEL, Vocab


def masked_offsets(offsets: np.ndarray, pert: np.ndarray, index, vocab: Vocab,
                   part_shift: Callable[[Condition, tuple[str, ...]], np.ndarray]) -> np.ndarray:
    """[covariate rows, 2^P, width]: the offset of each row (``offsets`` [rows, width]; ``pert`` [rows, P] its
    parts) with the parts of bit mask m dropped (m = 0: its own offset); masks naming a padding position are never
    drawn and keep the row's offset. The refits run once, here, not per batch."""
    P = pert.shape[1]
    if P > 4:
        raise DataError(f"model.anchor_unseen anchors every subset of a combination's parts: at most 4 parts, "
                        f"but a training perturbation has {P}")
    out = np.repeat(offsets[:, None, :], 2**P, axis=1)
    for u in range(index.n_units):
        cond = index.conditions[index.unit_cond[u]]
        real = [j for j in range(P) if pert[u, j] >= FIRST_LABEL]
        for m in range(1, 2**P):
            bits = [j for j in range(P) if m >> j & 1]
            if set(bits) <= set(real):
                out[u, m] = part_shift(cond, tuple(vocab.pert[pert[u, j]] for j in bits))
    return out


def de_weights(X, index, codec, encoded: np.ndarray | None, alpha: float, cap: float = 0.0) -> np.ndarray:
    """[covariate rows, width]: unit u's set-mean weights (1 + α·r)/(1 + α·mean r), r = min(|Δ_u|/mean|Δ_u|, cap)
    (``cap`` 0: no cap, and the weights are (1 + α·r)/(1 + α)), Δ_u = its cells' mean minus its control pool's in
    model space (``encoded``: a latent codec's cells, else X through ``codec``); each unit's weights average 1; the
    control pools' rows (control->control sets) all 1."""
    from perturbdiff.data._store import row_mean

    src = X if encoded is None else encoded
    code = np.full(index.n_obs, -1, np.int64)
    for u, rows in enumerate(index.unit_rows):
        code[rows] = u
    units = group_means(src, code, index.n_units)  # one indicator product for every unit
    pools = np.zeros((len(index.pools), src.shape[1]))
    for p in np.unique(index.unit_pool):  # the pools some unit draws from (pools may share cells)
        pools[p] = row_mean(src, index.pools[p])
    size = np.abs(units - pools[index.unit_pool]).astype(np.float32)
    if encoded is None:
        size = codec.to_model(size)  # log1p -> model space: a scale, so |Δ| scales with it
    out = np.ones((index.n_units + index.n_own_pools, size.shape[1]), np.float32)
    scale = size.mean(1, keepdims=True)
    moved = scale[:, 0] > 0
    r, norm = size[moved] / scale[moved], 1.0 + alpha  # uncapped, mean r = 1
    if cap > 0:  # the heavy tail: uncapped, a few genes carry most of the term
        r = np.minimum(r, np.float32(cap))
        norm = 1.0 + alpha * r.mean(1, keepdims=True)
    out[: index.n_units][moved] = (1.0 + alpha * r) / norm
    return out


def validation_cells(groups: Sequence[np.ndarray], n: int, seed: int, set_size: int) -> list[np.ndarray]:
    """The rows each validation condition is scored on (``train.val_cells``): ``n`` > 0 drawn at random once
    (fixed by ``seed``), in row order; 0 = its first 2 × ``set_size`` rows in file order, as every run before."""
    if n <= 0:
        return [g[: 2 * set_size] for g in groups]
    rng = np.random.default_rng([seed, 2])
    return [np.sort(rng.choice(g, min(len(g), n), replace=False)) for g in groups]
