"""Baselines for perturbations never seen in training (issue 14): the mean over training perturbations, and
k nearest neighbours in an embedding table (by default the HPO knowledge embedding)."""

from __future__ import annotations

import numpy as np

from perturbdiff._errors import DataError
from perturbdiff.baselines._baselines import AdditiveBaseline, Baseline
from perturbdiff.data import Condition, Context, pert_parts


class TrainingMeanBaseline(Baseline):
    """Context controls + the mean shift over every training perturbation of that context (over all training
    conditions where the context has none): the bar for perturbations never seen (Ahlmann-Eltze et al., Nat Methods
    2025). It ignores which perturbation is asked for."""

    name = "train_mean"

    def delta(self, ctx: Context, pert: str) -> np.ndarray:
        st = self.state
        if pert == st.keys.control_value:
            return np.zeros(len(st.genes))
        mine = [c for c in st.train_mean if c[0] == ctx]
        return np.mean([st.shift(c) for c in (mine or list(st.train_mean))], axis=0)

    def _cells(self, cond: Condition, rows: np.ndarray) -> np.ndarray:
        return np.clip(self._controls(rows) + self.delta(*cond)[None, :], 0.0, None)


class KNNBaseline(AdditiveBaseline):
    """Additive over parts, an unseen part's shift the similarity-weighted mean of its ``k`` most similar trained
    single perturbations in an embedding ``table`` (labels, [n, E]; cosine, positive similarities only; default:
    the HPO knowledge embedding of the ``knowledge`` prior, 32 dimensions); a part neither trained nor in the table:
    DataError naming it, no effect with ``unseen="zero"``, or with ``unseen="mean"`` the mean shift over the
    context's trained singles (the bar for a gene nothing is known about, Ahlmann-Eltze et al., Nat Methods 2025;
    over every training condition of the context where it has no single, over all of them where it has none)."""

    name = "knn"
    UNSEEN = ("error", "zero", "mean")

    def __init__(self, table: tuple[list[str], np.ndarray] | None = None, k: int = 5, unseen: str = "error") -> None:
        super().__init__(unseen)
        self._table, self._index = table, None
        self.k = int(k)

    def _embedding(self) -> tuple[dict[str, int], np.ndarray]:
        """(label -> row, unit-norm rows) of the table, built at the first unseen part (the default reads HPO)."""
        if self._index is None:
            if self._table is None:
                from perturbdiff.data import knowledge_block

                block = knowledge_block(dim=32, seed=0)
                self._table = (block.labels, block.matrix)
            labels, mat = self._table
            mat = np.asarray(mat, np.float64)
            self._index = ({str(q): i for i, q in enumerate(labels)},
                           mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12))
        return self._index

    def neighbours(self, part: str) -> dict[str, float]:
        """{trained single: weight} of ``part``'s nearest neighbours in the table (empty: none similar)."""
        st = self.state
        where, unit = self._embedding()
        singles = sorted({p for _, p in st.train_mean if p in where and "+" not in p})
        if part not in where or not singles:
            return {}
        sim = unit[[where[p] for p in singles]] @ unit[where[part]]
        top = np.argsort(-sim)[: self.k]
        return {singles[i]: float(sim[i]) for i in top if sim[i] > 0}

    def mean_single(self, ctx: Context) -> np.ndarray:
        """The mean shift over the trained single perturbations of ``ctx`` (``unseen="mean"``)."""
        st = self.state
        mine = [c for c in st.train_mean if c[0] == ctx] or list(st.train_mean)
        singles = [c for c in mine if len(pert_parts(c[1])) == 1] or mine
        return np.mean([st.shift(c) for c in singles], axis=0) if singles else np.zeros(len(st.genes))

    def delta(self, ctx: Context, pert: str) -> np.ndarray:
        st = self.state
        if pert == st.keys.control_value or st.contexts_of(pert):
            return super().delta(ctx, pert)
        out = np.zeros(len(st.genes))
        for part in pert_parts(pert):
            if st.contexts_of(part):
                out += super().delta(ctx, part)
                continue
            near = self.neighbours(part)
            if not near and self.unseen == "mean":
                out += self.mean_single(ctx)
                continue
            if not near:
                if self.unseen == "error":
                    raise DataError(f"perturbation {pert!r}: part {part!r} was neither trained nor has a similar "
                                    "trained perturbation in the embedding table; the knn baseline cannot place it "
                                    "(unseen='zero' predicts no effect for it)")
                continue
            w = np.array(list(near.values()))
            out += np.einsum("k,kg->g", w / w.sum(), np.stack([super(KNNBaseline, self).delta(ctx, p) for p in near]))
        return out
