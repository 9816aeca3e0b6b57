"""The anchor (``model.anchor``): every set's control stream is shifted by a baseline's predicted pseudobulk
shift of the set's condition, so the network — whose output is the control mean plus its residual
(``diffusion.control_skip``) — starts from that baseline and learns what the baseline misses.

The baseline is fitted on the training conditions' shifts (pseudobulk minus the context's control pseudobulk,
log1p). Every condition's shift is the one the baseline predicts *without* that condition: a training condition
gets the shift it would get unseen, so the network learns to correct the baseline where it errs, as it must for a
held-out condition, instead of learning that the anchor is always right. The shifts travel in the checkpoint, so
a loaded run anchors new conditions and its user's own controls the same way; control sets are never shifted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from perturbdiff._config_rules import AUTO_ANCHORS
from perturbdiff._errors import CheckpointError
from perturbdiff.baselines import make_baseline
from perturbdiff.data import Condition, DataKeys, condition_shifts

FALLBACK = "knn"  # model.anchor = "auto" without validation conditions to choose on


@dataclass
class Anchor:
    """A baseline (``route``) over the training conditions' shifts [K, G] (log1p)."""

    route: str
    keys: DataKeys
    genes: list[str]
    conditions: list[Condition]
    shifts: np.ndarray
    _baseline: Any = field(default=None, repr=False)

    @classmethod
    def fit(cls, route: str, adata, keys: DataKeys, train) -> Anchor:
        """The training conditions' shifts from ``adata`` (log1p; a store is read in blocks)."""
        shifts = condition_shifts(adata, keys, train)
        table = np.stack(list(shifts.values())) if shifts else np.zeros((0, adata.n_vars))
        return cls(route, keys, [str(g) for g in adata.var_names], list(shifts), table.astype(np.float32))

    @classmethod
    def choose(cls, adata, keys: DataKeys, split) -> tuple[Anchor, dict[str, float]]:
        """``model.anchor = "auto"``: the route whose shifts of the split's validation conditions are nearest their
        measured shifts (mean squared error over genes, averaged over the conditions), with every route's score;
        without validation conditions (or their controls), knn and no scores. Additive is not a candidate: knn is
        additive wherever a part was trained, and places the others among their neighbours."""
        anchor = cls.fit(FALLBACK, adata, keys, split.train)
        measured = condition_shifts(adata, keys, split.val)
        if not measured:
            return anchor, {}
        real, val = np.stack(list(measured.values())), list(measured)  # (V, G)
        scores = {}
        for route in AUTO_ANCHORS:
            candidate = dataclasses.replace(anchor, route=route, _baseline=None)
            scores[route] = float(np.mean((candidate.shift(val) - real) ** 2))
        best = min(scores, key=scores.get)
        return dataclasses.replace(anchor, route=best, _baseline=None), scores

    @property
    def baseline(self):
        if self._baseline is None:
            table = {c: self.shifts[k] for k, c in enumerate(self.conditions)}
            name, unseen = ("knn", "mean") if self.route == "knn_mean" else (self.route, "zero")
            self._baseline = make_baseline(name, unseen=unseen).fit_shifts(self.keys, self.genes, table)
            self._baseline.verbose = False  # no "unseen, taken as no effect" line per condition and part
        return self._baseline

    def shift(self, conditions, without=None) -> np.ndarray:
        """[n, G] log1p shift of each condition, each predicted without itself (and, given ``without[i]``, without
        every training condition holding one of those parts: as if they had never been perturbed); zero for
        control conditions."""
        out = np.zeros((len(conditions), len(self.genes)), np.float32)
        for i, (ctx, pert) in enumerate(conditions):
            if pert != self.keys.control_value:
                parts = () if without is None else tuple(without[i])
                out[i] = self.baseline.delta_left_out(tuple(map(str, ctx)), str(pert), parts)
        return out

    def offsets(self, conditions, codec, without=None) -> np.ndarray:
        """The shifts in the codec's model space [n, G] (a scale codec: log1p / scale)."""
        return codec.to_model(self.shift(conditions, without))

    # -- persistence -----------------------------------------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        return {"route": self.route, "conditions": [[list(c), p] for c, p in self.conditions]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"anchor.shifts": torch.from_numpy(np.ascontiguousarray(self.shifts))}

    @classmethod
    def from_meta(cls, meta: dict | None, tensors: dict, keys: DataKeys, genes) -> Anchor | None:
        if not meta:
            return None
        conds = [(tuple(map(str, c)), str(p)) for c, p in meta["conditions"]]
        if "anchor.shifts" not in tensors or tuple(tensors["anchor.shifts"].shape) != (len(conds), len(genes)):
            raise CheckpointError(f"the checkpoint records a {meta['route']} anchor over {len(conds)} conditions but "
                                  "holds no matching anchor.shifts tensor: it is damaged or was edited")
        shifts = tensors["anchor.shifts"].numpy().astype(np.float32)
        return cls(str(meta["route"]), keys, [str(g) for g in genes], conds, shifts)
