"""Simple baselines (SPEC §6): control, per-perturbation mean, additive shift, ridge on pert + context.

Definitions follow shared/benchmarks/PEERS.md. Pseudobulks are means of log1p rows. A *shift* is a training
condition's pseudobulk minus the pseudobulk of its context's control cells. Shift-based baselines return whole
cells: the context's sampled control cells plus the predicted shift, clipped at 0 (DE tests see real spread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import logger
from perturbdiff.data import (
    Condition,
    Context,
    DataKeys,
    Split,
    condition_codes,
    group_means,
    pert_parts,
    training_means,
)


@dataclass
class _Fitted:
    """What every baseline keeps from ``fit``: training pseudobulks, control pools, cell counts."""

    keys: DataKeys
    genes: pd.Index
    X: object  # the data's log1p matrix (not copied); only control rows are read at predict time
    train_mean: dict[Condition, np.ndarray]  # (G,) per training condition
    train_n: dict[Condition, int]
    ctrl_rows: dict[Context, np.ndarray]  # row indices of control cells per context
    ctrl_mean: dict[Context, np.ndarray]
    n_cells: dict[Condition, int]  # real cells per condition (any subset): the default number to predict

    def shift(self, cond: Condition) -> np.ndarray:
        """Δ = pseudobulk(condition) − pseudobulk(its context's controls) for a training condition."""
        return self.train_mean[cond] - self.ctrl_mean[cond[0]]

    def contexts_of(self, pert: str) -> list[Context]:
        return [c for c, p in self.train_mean if p == pert]


def _as_condition(cond) -> Condition:
    ctx, pert = cond
    return ((str(ctx),) if isinstance(ctx, str) else tuple(str(c) for c in ctx)), str(pert)


def _default_keys(split: Split) -> DataKeys:
    return DataKeys(split.pert_col, split.control, tuple(split.context_cols), "log1p")


def fit_state(adata: AnnData, split: Split, keys: DataKeys | None = None) -> _Fitted:
    """Index the data once: pseudobulks of training and control groups, control rows per context."""
    keys = keys or _default_keys(split)
    split.check(adata, keys)
    train = {_as_condition(c) for c in split.train}
    codes, conds, means = training_means(adata, keys, train)
    counts = np.bincount(codes, minlength=len(conds))
    ctrl_rows: dict[Context, np.ndarray] = {}
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(conds) + 1))
    for k, (ctx, pert) in enumerate(conds):
        if pert == keys.control_value:
            ctrl_rows[ctx] = order[starts[k] : starts[k + 1]]
    return _Fitted(
        keys=keys,
        genes=pd.Index(adata.var_names),
        X=adata.X,
        train_mean={c: means[k] for k, c in enumerate(conds) if c in train},
        train_n={c: int(counts[k]) for k, c in enumerate(conds) if c in train},
        ctrl_rows=ctrl_rows,
        ctrl_mean={c[0]: means[k] for k, c in enumerate(conds) if c[1] == keys.control_value},
        n_cells={c: int(counts[k]) for k, c in enumerate(conds)},
    )


class Baseline:
    """Shared fit / predict: subclasses define ``_cells(cond, rows) -> (n, G)`` from sampled control rows."""

    name = "baseline"
    UNSEEN = ("error", "zero")

    def __init__(self, unseen: str = "error") -> None:
        if unseen not in self.UNSEEN:
            raise ConfigError(f"unseen must be one of {', '.join(map(repr, self.UNSEEN))}, got {unseen!r}")
        self.unseen = unseen  # a perturbation none of whose parts was trained: DataError, or no effect
        self.verbose = True  # log the unseen parts taken as no effect
        self._fit: _Fitted | None = None

    def fit(self, adata_prep: AnnData, split: Split, keys: DataKeys | None = None) -> Baseline:
        """Fit on the training conditions of ``split`` (control cells of every context are visible)."""
        self._fit = fit_state(adata_prep, split, keys)
        self._after_fit()
        return self

    def _after_fit(self) -> None:
        pass

    def fit_shifts(self, keys: DataKeys, genes, shifts: dict[Condition, np.ndarray]) -> Baseline:
        """Fit from the training conditions' pseudobulk shifts alone (no cells): ``delta`` works, ``predict`` does
        not. The anchor (model/_anchor.py) refits a baseline this way from the shifts a checkpoint carries."""
        shifts = {_as_condition(c): np.asarray(v, np.float64) for c, v in shifts.items()}
        zero = np.zeros(len(genes))
        self._fit = _Fitted(keys=keys, genes=pd.Index([str(g) for g in genes]), X=None, train_mean=shifts,
                            train_n={c: 1 for c in shifts}, ctrl_rows={}, ctrl_mean={c[0]: zero for c in shifts},
                            n_cells={})
        self._after_fit()
        return self

    def delta_left_out(self, ctx: Context, pert: str, parts: Sequence[str] = ()) -> np.ndarray:
        """``delta(ctx, pert)`` as if that condition had not been trained on (refitted without it), so a training
        condition gets the shift the baseline would predict for it unseen; with ``parts``, also without every
        training condition holding one of them (in any context), as if those parts had never been perturbed."""
        st, cond, drop = self.state, (ctx, pert), set(parts)
        gone = {c for c in st.train_mean if c == cond or (drop and drop.intersection(pert_parts(c[1])))}
        if not gone:
            return self.delta(ctx, pert)
        if len(gone) == len(st.train_mean):
            return np.zeros(len(st.genes))  # nothing left to learn from: no effect
        kept_mean, kept_n, fitted = st.train_mean, st.train_n, dict(vars(self))  # what _after_fit derived, too
        st.train_mean = {c: v for c, v in kept_mean.items() if c not in gone}
        st.train_n = {c: v for c, v in kept_n.items() if c not in gone}
        try:
            self._after_fit()
            return self.delta(ctx, pert)
        finally:
            st.train_mean, st.train_n = kept_mean, kept_n
            vars(self).update(fitted)

    @property
    def state(self) -> _Fitted:
        if self._fit is None:
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(adata, split, keys) first")
        return self._fit

    def predict(self, conditions, n_cells: list[int] | None = None, seed: int = 0) -> AnnData:
        """Predicted log1p cells per condition (``n_cells[i]`` of them; default: the real group's size)."""
        st = self.state
        conds = [_as_condition(c) for c in conditions]
        if n_cells is None:
            n_cells = [st.n_cells.get(c) or len(self._pool(c[0])) for c in conds]
        if len(n_cells) != len(conds):
            raise DataError(f"n_cells has {len(n_cells)} entries for {len(conds)} conditions")
        rng = np.random.default_rng(seed)
        blocks = []
        for cond, n in zip(conds, n_cells):
            pool = self._pool(cond[0])
            rows = rng.choice(pool, size=int(n), replace=True)
            blocks.append(np.asarray(self._cells(cond, rows), dtype=np.float32))  # (n, G)
        return self._to_anndata(conds, n_cells, blocks)

    def _pool(self, ctx: Context) -> np.ndarray:
        pool = self.state.ctrl_rows.get(ctx)
        if pool is None or len(pool) == 0:
            cols = ", ".join(self.state.keys.context_keys)
            raise DataError(f"no control cells for context {','.join(map(str, ctx))} ({cols}); cannot predict its "
                            "conditions")
        return pool

    def _controls(self, rows: np.ndarray) -> np.ndarray:
        x = self.state.X[rows]
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)  # (n, G)

    def _to_anndata(self, conds: list[Condition], n_cells, blocks: list[np.ndarray]) -> AnnData:
        keys = self.state.keys
        reps = np.repeat(np.arange(len(conds)), np.asarray(n_cells, dtype=np.int64))  # condition of each cell

        def column(values: list[str]) -> pd.Categorical:
            return pd.Categorical(np.asarray(values, dtype=object)[reps])

        obs = pd.DataFrame({keys.pert_key: column([c[1] for c in conds])})
        for j, col in enumerate(keys.context_keys):
            obs[col] = column([c[0][j] for c in conds])
        obs.index = pd.Index(np.char.add(f"{self.name}-", np.arange(len(reps)).astype(str)))
        X = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, len(self.state.genes)), np.float32)
        return AnnData(X=X, obs=obs, var=pd.DataFrame(index=self.state.genes.copy()))

    def _known_parts(self, cond: Condition, known: Callable[[str], bool]) -> list[str]:
        """Parts of ``cond``'s label with a trained effect; unseen parts count as no effect (logged). None
        known: DataError, or no effect at all with ``unseen="zero"``."""
        ctx, pert = cond
        parts = [p for p in pert_parts(pert) if p != self.state.keys.control_value]
        missing = [p for p in parts if not known(p)]
        if missing and len(missing) == len(parts) and self.unseen == "error":
            raise DataError(
                f"perturbation {pert!r} (context {','.join(map(str, ctx))}): no part of it was seen in training "
                f"({', '.join(repr(m) for m in missing)}); {self.name} baseline cannot predict it "
                "(unseen='zero' predicts no effect)"
            )
        if missing and self.verbose:
            logger.info(f"{self.name}: {', '.join(missing)} of {pert!r} unseen in training, taken as no effect")
        return [p for p in parts if known(p)]


class ControlBaseline(Baseline):
    """Predict no effect: the context's own control cells, sampled."""

    name = "control"

    def _cells(self, cond: Condition, rows: np.ndarray) -> np.ndarray:
        return self._controls(rows)


class AdditiveBaseline(Baseline):
    """Context controls + Δ(pert): Δ from the same context if trained there, else the mean over
    training contexts; unseen combinations = Σ Δ(part); clipped at 0."""

    name = "additive"

    def delta(self, ctx: Context, pert: str) -> np.ndarray:
        """Predicted pseudobulk shift of ``pert`` in ``ctx`` (G,)."""
        st = self.state
        if pert == st.keys.control_value:
            return np.zeros(len(st.genes))
        if (ctx, pert) in st.train_mean:
            return st.shift((ctx, pert))
        seen = st.contexts_of(pert)
        if seen:
            return np.mean([st.shift((c, pert)) for c in seen], axis=0)
        parts = self._known_parts((ctx, pert), lambda p: bool(st.contexts_of(p)))
        return np.sum([self.delta(ctx, p) for p in parts], axis=0) if parts else np.zeros(len(st.genes))

    def _cells(self, cond: Condition, rows: np.ndarray) -> np.ndarray:
        return np.clip(self._controls(rows) + self.delta(*cond)[None, :], 0.0, None)


class MeanBaseline(Baseline):
    """Every cell = the perturbation's mean over training cells (PEERS ``pert_mean``).

    ``overall``: pooled over training contexts; ``context``: the same context's mean when trained there, else
    overall; ``batch``: the mean in the sampled control cell's batch when trained there, else overall. Unseen
    combinations: the context's control mean + Σ pooled Δ(part), clipped at 0.
    """

    name = "mean"
    VARIANTS = ("overall", "context", "batch")

    def __init__(self, variant: str = "overall", unseen: str = "error") -> None:
        super().__init__(unseen)
        if variant not in self.VARIANTS:
            raise ConfigError(f"MeanBaseline variant must be one of {', '.join(self.VARIANTS)}, got {variant!r}")
        self.variant = variant
        self._batch: tuple[np.ndarray, dict[tuple[str, str], np.ndarray]] | None = None

    def fit(self, adata_prep: AnnData, split: Split, keys: DataKeys | None = None) -> MeanBaseline:
        super().fit(adata_prep, split, keys)
        if self.variant == "batch":
            self._batch = _batch_means(adata_prep, split, self.state.keys)
        return self

    def _pooled(self, pert: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(pooled mean, pooled Δ) over training cells of ``pert`` (cell-weighted); None if untrained."""
        st = self.state
        seen = st.contexts_of(pert)
        if not seen:
            return None
        w = np.array([st.train_n[(c, pert)] for c in seen], dtype=np.float64)
        w /= w.sum()
        mean = np.einsum("k,kg->g", w, np.stack([st.train_mean[(c, pert)] for c in seen]))
        delta = np.einsum("k,kg->g", w, np.stack([st.shift((c, pert)) for c in seen]))
        return mean, delta

    def mean_profile(self, ctx: Context, pert: str) -> np.ndarray:
        """Predicted pseudobulk (G,) of ``pert`` in ``ctx`` (batch variant: its fallback)."""
        st = self.state
        if pert == st.keys.control_value:
            return st.ctrl_mean[ctx]
        if self.variant == "context" and (ctx, pert) in st.train_mean:
            return st.train_mean[(ctx, pert)]
        pooled = self._pooled(pert)
        if pooled is not None:
            return pooled[0]
        parts = self._known_parts((ctx, pert), lambda p: self._pooled(p) is not None)
        return st.ctrl_mean[ctx] + sum((self._pooled(p)[1] for p in parts), np.zeros(len(st.genes)))

    def _cells(self, cond: Condition, rows: np.ndarray) -> np.ndarray:
        profile = np.clip(self.mean_profile(*cond), 0.0, None)  # control mean + Σ Δ can dip below 0
        out = np.repeat(profile[None, :], len(rows), axis=0)  # (n, G)
        if self.variant == "batch" and self._batch is not None:
            batch_of, table = self._batch
            for b in np.unique(batch_of[rows]):
                hit = table.get((str(b), cond[1]))
                if hit is not None:
                    out[batch_of[rows] == b] = hit
        return out


def _batch_means(adata: AnnData, split: Split, keys: DataKeys) -> tuple[np.ndarray, dict]:
    """Per-cell batch labels and the pseudobulk of every (batch, perturbation) over training cells."""
    if keys.batch_key is None:
        raise ConfigError("MeanBaseline(variant='batch') needs a batch column: set batch_key in the data keys")
    codes, conds = condition_codes(adata, keys)
    train = {_as_condition(c) for c in split.train}
    in_train = np.array([c in train for c in conds], dtype=bool)[codes]
    bkeys = DataKeys(keys.pert_key, keys.control_value, (keys.batch_key,), keys.input_kind)
    bcodes, bconds = condition_codes(adata, bkeys)
    means = group_means(adata.X, np.where(in_train, bcodes, -1), len(bconds))
    present = np.bincount(bcodes[in_train], minlength=len(bconds)) > 0
    table = {(b[0], p): means[k] for k, (b, p) in enumerate(bconds) if present[k]}
    batch_of = np.asarray(adata.obs[keys.batch_key].astype(str).to_numpy(), dtype=object)
    return batch_of, table


class LinearBaseline(Baseline):
    """Ridge regression Δ ≈ W·[multi-hot(parts) ; one-hot(context values)] + b over training
    conditions, applied to the context's control cells; clipped at 0."""

    name = "linear"

    def __init__(self, alpha: float = 1.0, unseen: str = "error") -> None:
        super().__init__(unseen)
        self.alpha = float(alpha)

    def _after_fit(self) -> None:
        from sklearn.linear_model import Ridge

        st = self.state
        conds = list(st.train_mean)
        self._parts = sorted({p for _, pert in conds for p in pert_parts(pert) if p != st.keys.control_value})
        self._ctx_values = [sorted({c[j] for c, _ in conds}) for j in range(len(st.keys.context_keys))]
        features = self._features(conds)  # (K, F)
        targets = np.stack([st.shift(c) for c in conds])  # (K, G)
        self._ridge = Ridge(alpha=self.alpha).fit(features, targets)

    def _features(self, conds: list[Condition]) -> np.ndarray:
        """[multi-hot over perturbation parts ; one-hot per context column]; unseen values -> 0."""
        part_ix = {p: i for i, p in enumerate(self._parts)}
        blocks = [np.zeros((len(conds), len(self._parts)))]
        for vals in self._ctx_values:
            blocks.append(np.zeros((len(conds), len(vals))))
        for r, (ctx, pert) in enumerate(conds):
            parts = self._known_parts((ctx, pert), part_ix.__contains__)
            blocks[0][r, [part_ix[p] for p in parts]] = 1.0
            for j, vals in enumerate(self._ctx_values):
                if ctx[j] in vals:
                    blocks[j + 1][r, vals.index(ctx[j])] = 1.0
        return np.concatenate(blocks, axis=1)

    def delta(self, ctx: Context, pert: str) -> np.ndarray:
        """Predicted pseudobulk shift (G,); zero for the control value."""
        if pert == self.state.keys.control_value:
            return np.zeros(len(self.state.genes))
        return self._ridge.predict(self._features([(ctx, pert)]))[0]

    def _cells(self, cond: Condition, rows: np.ndarray) -> np.ndarray:
        return np.clip(self._controls(rows) + self.delta(*cond)[None, :], 0.0, None)
