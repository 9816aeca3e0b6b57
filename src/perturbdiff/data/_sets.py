"""Cell sets (SPEC §1): groups per condition, matched control pools, the per-epoch set sampler and loader."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data._codec import ScaleCodec
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._loader import SetBatch
from perturbdiff.data._matrix import row_reader
from perturbdiff.data._set_tables import de_weights, masked_offsets
from perturbdiff.data._split import Condition, Context, condition_codes, obs_codes
from perturbdiff.data._vocab import FIRST_LABEL, GENERIC, Vocab

PoolKey = tuple[Context, "str | None"]  # (context, batch or None)


def _labels(adata, col: str | None) -> tuple[np.ndarray, list[str | None]]:
    """Per-cell codes (-1 = missing / no column) and labels of an optional obs column."""
    if col is None:
        return np.full(adata.n_obs, -1, dtype=np.int64), []
    return obs_codes(adata.obs, col, required=False)


def split_rows(rows: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Group ``rows`` by integer ``key``: (sorted unique keys, rows of each key)."""
    uniq, inv = np.unique(key, return_inverse=True)
    if len(uniq) == 0:
        return uniq, []
    order = np.argsort(inv, kind="stable")
    return uniq, np.split(rows[order], np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])


def _subsample(groups: list[np.ndarray], keep: list[bool], fraction: float, seed: int) -> list[np.ndarray]:
    """Keep a seeded fraction (at least one cell) of each group marked in ``keep``."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return groups
    rng = np.random.default_rng(seed)
    out = []
    for g, k in zip(groups, keep):
        n = max(1, int(math.floor(fraction * len(g) + 0.5))) if k and len(g) else len(g)
        out.append(np.sort(rng.choice(g, n, replace=False)) if n < len(g) else g)
    return out


@dataclass
class CellSetIndex:
    """Rows per condition, split into units (condition x batch x dose), each with a matched control pool."""

    keys: DataKeys
    conditions: list[Condition]
    groups: list[np.ndarray]  # cell rows per condition, same order as conditions
    unit_cond: np.ndarray  # [U] condition index of each unit
    unit_rows: list[np.ndarray]  # cell rows of each unit
    unit_batch: list[str | None]
    unit_dose: list[str | None]
    unit_pool: np.ndarray  # [U] pool index
    pools: list[np.ndarray]  # control rows per pool (own pools first, then fallback pools)
    pool_keys: list[PoolKey]
    n_own_pools: int  # pools[:n_own_pools]: a context's own control cells (sources of control->control sets)
    n_obs: int
    _pool_of: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, adata, keys: DataKeys, conditions: Sequence[Condition], *, fraction: float = 1.0, seed: int = 0
    ) -> CellSetIndex:
        """Group cells by condition; match each unit to control cells of its context (+ batch) or fallback."""
        conditions = [(tuple(c), str(p)) for c, p in conditions]
        if len(set(conditions)) != len(conditions):
            raise DataError("the conditions given to CellSetIndex.build contain duplicates")
        code, present = condition_codes(adata, keys)
        order = np.argsort(code, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(code, minlength=len(present)))])
        where = {c: i for i, c in enumerate(present)}
        empty = np.zeros(0, dtype=np.int64)
        groups = [order[bounds[where[c]] : bounds[where[c] + 1]] if c in where else empty for c in conditions]
        groups = _subsample(groups, [p != keys.control_value for _, p in conditions], fraction, seed)
        b_code, b_cats = _labels(adata, keys.batch_key)
        d_code, d_cats = _labels(adata, keys.dose_key)
        pools, pool_keys = _own_control_pools(code, present, keys, b_code, b_cats)
        rows = np.concatenate([empty, *groups])
        cond = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        nb, nd = len(b_cats) + 1, len(d_cats) + 1
        ukey, unit_rows = split_rows(rows, (cond * nb + b_code[rows] + 1) * nd + d_code[rows] + 1)
        unit_cond, ub, ud = ukey // (nb * nd), (ukey // nd) % nb - 1, ukey % nd - 1
        index = cls(
            keys=keys,
            conditions=conditions,
            groups=groups,
            unit_cond=unit_cond.astype(np.int64),
            unit_rows=unit_rows,
            unit_batch=[b_cats[b] if b >= 0 else None for b in ub.tolist()],
            unit_dose=[d_cats[d] if d >= 0 else None for d in ud.tolist()],
            unit_pool=np.zeros(0, np.int64),
            pools=pools,
            pool_keys=pool_keys,
            n_own_pools=len(pools),
            n_obs=adata.n_obs,
        )
        keys_u = [(conditions[c][0], b) for c, b in zip(index.unit_cond.tolist(), index.unit_batch)]
        index.unit_pool = np.asarray([index.resolve_pool(k) for k in keys_u], dtype=np.int64)
        return index

    @property
    def n_units(self) -> int:
        return len(self.unit_rows)

    def control_pool(self, i: int) -> np.ndarray:
        """Row indices of the control cells matched to condition ``i`` (union over its batches)."""
        units = np.flatnonzero(self.unit_cond == i)
        if len(units) == 0:
            return self.pools[self.resolve_pool((self.conditions[i][0], None))]
        return np.unique(np.concatenate([self.pools[p] for p in self.unit_pool[units]]))

    def resolve_pool(self, key: PoolKey) -> int:
        """Pool index for (context, batch); an empty pool falls back (SPEC §1 order), logged once per key."""
        if not self._pool_of:
            self._pool_of.update({k: i for i, k in enumerate(self.pool_keys)})
        if key in self._pool_of:
            return self._pool_of[key]
        ctx, batch = key
        own = self.pool_keys[: self.n_own_pools]
        options = [
            ("control cells of the same context from other batches", [k[0] == ctx for k in own]),
            ("all control cells", [True] * len(own)),
        ]
        if self.keys.batch_key is not None and batch is not None:
            options.insert(0, ("control cells of the same batch from other contexts", [k[1] == batch for k in own]))
        what, sel = next((w, m) for w, m in options if any(m))
        pool = np.unique(np.concatenate([self.pools[i] for i in np.flatnonzero(sel)]))
        if self.keys.batch_key is None:
            logger.info("no control cells for context %s: using all control cells", "/".join(ctx))
        elif batch is not None or what == "all control cells":  # batch None: any batch of the context is a match
            logger.info("no control cells for context %s in batch %s: using %s", "/".join(ctx), batch, what)
        self.pools.append(pool)
        self.pool_keys.append(key)
        self._pool_of[key] = len(self.pools) - 1
        return self._pool_of[key]


def _own_control_pools(code, present, keys: DataKeys, b_code, b_cats) -> tuple[list, list]:
    """Control cell rows per (context, batch) present in the data."""
    ctrl = np.flatnonzero(np.isin(code, [i for i, c in enumerate(present) if c[1] == keys.control_value]))
    if len(ctrl) == 0:
        raise DataError(f"no control cells: no cell has {keys.pert_key!r} == {keys.control_value!r}")
    nb = len(b_cats) + 1
    ukey, pools = split_rows(ctrl, code[ctrl] * nb + b_code[ctrl] + 1)
    pool_keys = [(present[k // nb][0], b_cats[k % nb - 1] if k % nb else None) for k in ukey.tolist()]
    return list(pools), pool_keys


# -- per-epoch sampling (all index arithmetic vectorised) ---------------------------------------------------
def cut_sets(rng, flat_rows: np.ndarray, sizes: np.ndarray, S: int) -> tuple[np.ndarray, ...]:
    """Shuffle each unit, pad it to a multiple of S by sampling with replacement, cut into sets of S.

    Returns rows [n_sets, S], pad flags [n_sets, S] (True on padded copies) and the unit of each set [n_sets].
    """
    n_units = len(sizes)
    unit_of = np.repeat(np.arange(n_units), sizes)
    shuffled = flat_rows[np.lexsort((rng.random(len(flat_rows)), unit_of))]  # within-unit random order
    n_pad = (-sizes) % S
    pad_unit = np.repeat(np.arange(n_units), n_pad)
    starts = np.cumsum(sizes) - sizes
    pad_rows = flat_rows[starts[pad_unit] + (rng.random(len(pad_unit)) * sizes[pad_unit]).astype(np.int64)]
    units = np.concatenate([unit_of, pad_unit])
    order = np.argsort(units, kind="stable")  # each unit: its real cells, then its padded copies
    rows = np.concatenate([shuffled, pad_rows])[order].reshape(-1, S)
    pad = np.concatenate([np.zeros(len(unit_of), bool), np.ones(len(pad_unit), bool)])[order].reshape(-1, S)
    return rows, pad, units[order][::S]


def draw_positions(rng, n: int, k: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """k draws of S positions in [0, n): without replacement within a draw when n >= S.

    When n < S a draw is all n positions (shuffled) plus S - n sampled with replacement, flagged True.
    """
    if k == 0:
        return np.zeros((0, S), np.int64), np.zeros((0, S), bool)
    if n >= S * k:  # no repeats across draws either
        return rng.choice(n, S * k, replace=False).reshape(k, S), np.zeros((k, S), bool)
    if n >= S:  # permutations of the pool, each cut into n // S draws
        per = n // S
        perms = np.argsort(rng.random((-(-k // per), n)), axis=1)[:, : per * S]
        return perms.reshape(-1, S)[:k], np.zeros((k, S), bool)
    perm = np.argsort(rng.random((k, n)), axis=1)
    extra = rng.integers(0, n, size=(k, S - n))
    flags = np.concatenate([np.zeros((k, n), bool), np.ones((k, S - n), bool)], axis=1)
    return np.concatenate([perm, extra], axis=1), flags


def _by_value(values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(value, positions holding it) for each distinct value, by one stable sort."""
    uniq, groups = split_rows(np.arange(len(values)), values)
    return list(zip(uniq.tolist(), groups))


def _draw_from_pools(rng, pools: list[np.ndarray], pool_of_set: np.ndarray, S: int) -> np.ndarray:
    """Control rows [n, S] drawn for each set from its pool (grouped by pool: one draw_positions call per pool)."""
    rows = np.zeros((len(pool_of_set), S), np.int64)
    for p, sel in _by_value(pool_of_set):
        rows[sel] = pools[p][draw_positions(rng, len(pools[p]), len(sel), S)[0]]
    return rows


def _control_sets(rng, pools: list[np.ndarray], src: np.ndarray, S: int) -> tuple[np.ndarray, ...]:
    """Control->control sets: target = S control cells of a pool, control = another draw from that pool."""
    target = np.zeros((len(src), S), np.int64)
    control = np.zeros((len(src), S), np.int64)
    flags = np.zeros((len(src), S), bool)
    for p, sel in _by_value(src):
        pool = pools[p]
        if len(pool) >= 2 * S:  # disjoint halves of one draw
            pos, _ = draw_positions(rng, len(pool), len(sel), 2 * S)
            target[sel], control[sel] = pool[pos[:, :S]], pool[pos[:, S:]]
        else:
            pos, flags[sel] = draw_positions(rng, len(pool), len(sel), S)
            target[sel], control[sel] = pool[pos], pool[draw_positions(rng, len(pool), len(sel), S)[0]]
    return target, control, flags


class CellSetDataset(Dataset):
    """Sets of S cells of one condition unit + matched control sets, reshuffled from (seed, epoch); ``offsets``
    [units, width] (model space) shift each unit's control sets (the anchor), control->control sets unshifted.

    ``part_dropout``: each perturbation part of a set becomes the generic token with this probability (drawn per
    epoch, so resume is exact), and with ``part_shift(condition, dropped parts) -> [width]`` the set's control stream
    takes that shift instead of its unit's offset: the anchor of the condition as if those parts were never seen.

    ``mean_de_weight`` α > 0 adds ``mean_w`` [B, width] to each batch: the set-mean term's weight per gene,
    (1 + α·|Δ|/mean|Δ|) / (1 + α), where Δ is the set's unit's measured shift (its cells' mean minus its control
    pool's, model space), so the genes a condition moves count more and the weights average 1; control->control
    sets weigh every gene 1. ``mean_de_cap`` c > 0 caps |Δ|/mean|Δ| at c, and the weights become
    (1 + α·r)/(1 + α·mean r) with r the capped ratio (still averaging 1; the largest is at most 1 + α·c)."""

    def __init__(
        self,
        adata,
        index: CellSetIndex,
        vocab: Vocab,
        *,
        set_size: int,
        seed: int,
        control_set_fraction: float = 0.0,
        codec: ScaleCodec | None = None,
        offsets: np.ndarray | None = None,
        part_dropout: float = 0.0,
        part_shift: Callable[[Condition, tuple[str, ...]], np.ndarray] | None = None,
        mean_de_weight: float = 0.0,
        mean_de_cap: float = 0.0,
    ):
        if adata.n_obs != index.n_obs:
            raise DataError(f"the AnnData has {adata.n_obs} cells but the index was built on {index.n_obs}")
        if set_size < 1 or control_set_fraction < 0 or mean_de_weight < 0 or mean_de_cap < 0:
            raise DataError(f"set_size must be >= 1, control_set_fraction, mean_de_weight and mean_de_cap >= 0 (got "
                            f"{set_size}, {control_set_fraction}, {mean_de_weight}, {mean_de_cap})")
        self.X = row_reader(adata.X)  # in-memory CSR or a store's lazy rows
        self.index, self.set_size, self.seed = index, int(set_size), int(seed)
        self.control_set_fraction, self.codec = float(control_set_fraction), codec or ScaleCodec()
        # a latent codec's cells are encoded once, here: a step then gathers D-wide rows whatever the gene count
        self.encoded = None if self.codec.in_place else self._encode_all()
        self._sizes = np.asarray([len(r) for r in index.unit_rows], dtype=np.int64)
        self._flat = np.concatenate([np.zeros(0, np.int64), *index.unit_rows])
        self._cov = self._covariates(vocab)
        # model-space shift of each covariate row's control set (the anchor; pools: none) [rows, masks, width]:
        # mask m > 0 (with part_shift) = the row's anchor with the parts of bit mask m dropped
        self._offsets = None
        if offsets is not None:
            offsets = np.asarray(offsets, np.float32)
            if offsets.shape != (index.n_units, self.codec.width(self.X.shape[1])):
                raise DataError(f"offsets must be [units, width] = [{index.n_units}, "
                                f"{self.codec.width(self.X.shape[1])}], got {list(offsets.shape)}")
            self._offsets = np.concatenate([offsets, np.zeros((index.n_own_pools, offsets.shape[1]), np.float32)])
        self.part_dropout = float(part_dropout)
        self._dropped = None  # bit mask over pert positions per set (part_dropout)
        if self._offsets is not None:
            masked = part_shift is not None and self.part_dropout > 0.0
            self._offsets = (masked_offsets(self._offsets, self._cov["pert"], index, vocab, part_shift) if masked
                             else self._offsets[:, None, :])
        self._mean_w = None
        if mean_de_weight > 0:
            self._mean_w = de_weights(adata.X, index, self.codec, self.encoded, float(mean_de_weight),
                                     float(mean_de_cap))
        self.set_epoch(0)

    def _encode_all(self) -> np.ndarray:
        """Model-space rows [n_obs, D] of every cell a set can draw (training units, control pools; others 0)."""
        rows = np.unique(np.concatenate([np.zeros(0, np.int64), *self.index.unit_rows, *self.index.pools]))
        out = np.zeros((self.index.n_obs, self.codec.width(self.X.shape[1])), np.float32)
        for i in range(0, len(rows), 4096):
            blk = rows[i:i + 4096]
            out[blk] = self.codec.to_model(self.X[blk].toarray().astype(np.float32, copy=False))
        return out

    def _covariates(self, vocab: Vocab) -> dict[str, np.ndarray]:
        """Covariate table: one row per unit, then one per own control pool (control->control sets)."""
        ix, keys = self.index, self.index.keys
        own = range(ix.n_own_pools)
        conds = [ix.conditions[c] for c in ix.unit_cond.tolist()]
        conds += [(ix.pool_keys[p][0], keys.control_value) for p in own]
        batch = ix.unit_batch + [ix.pool_keys[p][1] for p in own] if keys.batch_key else None
        dose = ix.unit_dose + [None] * len(own) if keys.dose_key else None
        cov = vocab.encode(conds, batch, dose, unknown="unknown")
        cond = np.concatenate([ix.unit_cond, np.full(len(own), -1, np.int64)])
        return {"pert": cov.pert, "context": cov.context, "batch": cov.batch, "dose": cov.dose, "cond": cond}

    def set_epoch(self, epoch: int) -> None:
        """Shuffle, pad and cut every unit; draw control sets; add control->control sets, shuffle."""
        rng, S, ix = np.random.default_rng([self.seed, int(epoch)]), self.set_size, self.index
        rows, pad, unit = cut_sets(rng, self._flat, self._sizes, S)  # (n, S), (n, S), (n,)
        ctrl = _draw_from_pools(rng, ix.pools, ix.unit_pool[unit], S)  # (n, S)
        n_cc = int(math.floor(self.control_set_fraction * len(rows) + 0.5))
        src = rng.integers(0, ix.n_own_pools, size=n_cc)
        c_target, c_ctrl, c_pad = _control_sets(rng, ix.pools, src, S)
        order = rng.permutation(len(rows) + n_cc)
        dt = np.int32 if ix.n_obs < 2**31 else np.int64
        self._target = np.concatenate([rows, c_target])[order].astype(dt)  # (n_sets, S)
        self._control = np.concatenate([ctrl, c_ctrl])[order].astype(dt)  # (n_sets, S)
        self._pad = np.concatenate([pad, c_pad])[order]  # (n_sets, S)
        self._cov_row = np.concatenate([unit, ix.n_units + src])[order]  # (n_sets,)
        if self.part_dropout > 0.0:  # drawn last, so the sets are the same with or without it
            pert = self._cov["pert"][self._cov_row]  # (n_sets, P)
            drop = (rng.random(pert.shape) < self.part_dropout) & (pert >= FIRST_LABEL)
            self._dropped = (drop << np.arange(pert.shape[1])).sum(1)  # (n_sets,)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._target)

    def __getitems__(self, indices: Sequence[int]) -> SetBatch:
        """B sets in one gather: target/control [B, S, G] in model space (G: the codec's width), pad [B, S],
        covariates [B, ...].

        Every tensor of the batch is a view of one byte buffer, so a worker ships a single shared-memory block.
        """
        idx = np.asarray(indices, dtype=np.int64)
        B, S, G = len(idx), self.set_size, self.codec.width(self.X.shape[1])
        r = self._cov_row[idx]
        ints = {k: v[r] for k, v in self._cov.items()}  # pert [B, P], context [B, C], batch/dose/cond [B]
        masks = np.zeros(B, np.int64) if self._dropped is None else self._dropped[idx]  # (B,)
        if self._dropped is not None:  # part dropout: the dropped parts become the generic token
            bits = (masks[:, None] >> np.arange(ints["pert"].shape[1])) & 1
            ints["pert"] = np.where(bits == 1, GENERIC, ints["pert"])
        n_x, n_int = 2 * B * S * G * 4, sum(v.size for v in ints.values()) * 8
        n_w = 0 if self._mean_w is None else B * G * 4
        buf = torch.empty(n_x + n_w + n_int + B * S, dtype=torch.uint8)
        x = buf[:n_x].view(torch.float32).view(2, B, S, G)  # (2, B, S, G)
        out = x.numpy().reshape(2 * B * S, G)
        rows = np.concatenate([self._target[idx].ravel(), self._control[idx].ravel()])
        if self.encoded is not None:
            np.take(self.encoded, rows, axis=0, out=out)
        else:
            self.X[rows].toarray(out=out)
            self.codec.to_model(out, out=out)
        if self._offsets is not None:  # the anchor: each control set shifted by its condition's baseline shift
            col = masks if self._offsets.shape[1] > 1 else 0  # the anchor as if the set's dropped parts were unseen
            x[1].numpy()[...] += self._offsets[r, col][:, None, :]
        batched = {"target": x[0], "control": x[1]}
        if self._mean_w is not None:  # the set-mean term's gene weights of each set's unit
            batched["mean_w"] = buf[n_x : n_x + n_w].view(torch.float32).view(B, G)
            batched["mean_w"].numpy()[...] = self._mean_w[r]
        offset = n_x + n_w
        for k, v in ints.items():
            t = buf[offset : offset + v.size * 8].view(torch.int64).view(v.shape)
            t.numpy()[...] = v
            batched[k], offset = t, offset + v.size * 8
        pad = buf[offset:].view(torch.bool).view(B, S)
        pad.numpy()[...] = self._pad[idx]
        batched["pad"] = pad
        return SetBatch(batched)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One set: target/control [S, G] float32, pad [S], pert [P], context [C], batch, dose, cond [] (and
        mean_w [G] with ``mean_de_weight``)."""
        return {k: v[0] for k, v in self.__getitems__([i]).batched.items()}
