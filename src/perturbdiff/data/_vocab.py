"""Covariate vocabularies (perturbation parts, contexts, batch, dose) and their integer encoding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data._keys import DataKeys
from perturbdiff.data._split import Condition, obs_codes, pert_parts
from perturbdiff.data._split import labels as cond_labels

PAD, UNKNOWN, NONE = "<pad>", "<unknown>", "<none>"
GENERIC = 2  # pert index of <unknown>: a generic perturbation, trained by perturbation dropout
FIRST_LABEL = 3  # pert indices 0, 1, 2 are <pad>, the control and <unknown>; perturbation parts start here


def _observed(adata, col: str) -> list[str]:
    """Sorted distinct non-missing values of an obs column, as strings."""
    codes, cats = obs_codes(adata.obs, col, required=False)
    return sorted({cats[c] for c in np.unique(codes[codes >= 0])})


@dataclass
class Covariates:
    """Integer covariates per set / condition (numpy, LongTensor-ready)."""

    pert: np.ndarray  # [N, P] int64 part indices, 0-padded (P = max parts, >= 1)
    context: np.ndarray  # [N, C] int64
    batch: np.ndarray  # [N] int64
    dose: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.batch)


@dataclass
class Vocab:
    """Covariate vocabularies; index 0 reserved (<pad> / <unknown> / <none>); pert index 1 = the control."""

    pert: list[str]
    contexts: list[list[str]]
    batch: list[str] = field(default_factory=lambda: [NONE])
    dose: list[str] = field(default_factory=lambda: [NONE])
    context_keys: list[str] = field(default_factory=list)  # column names, for error messages

    @classmethod
    def build(cls, adata, keys: DataKeys, train_conditions: Sequence[Condition]) -> Vocab:
        """Perturbation parts from the training conditions only; contexts, batch and dose from all cells."""
        parts = {q for _, p in train_conditions if p != keys.control_value for q in pert_parts(p)}
        parts.discard(keys.control_value)
        batch = [UNKNOWN, *_observed(adata, keys.batch_key)] if keys.batch_key else [NONE]
        dose = [NONE, *_observed(adata, keys.dose_key)] if keys.dose_key else [NONE]
        return cls(
            pert=[PAD, keys.control_value, UNKNOWN, *sorted(parts)],
            contexts=[[UNKNOWN, *_observed(adata, k)] for k in keys.context_keys],
            batch=batch,
            dose=dose,
            context_keys=list(keys.context_keys),
        )

    @property
    def control(self) -> str:
        return self.pert[1]

    @property
    def first_label(self) -> int:
        """Index of the first perturbation part (after <pad>, the control and <unknown>)."""
        return FIRST_LABEL

    @property
    def sizes(self) -> dict[str, Any]:
        """Vocabulary sizes in the form the denoiser takes (``vocab_sizes``)."""
        ctx = [len(c) for c in self.contexts]
        return {"pert": len(self.pert), "contexts": ctx, "batch": len(self.batch), "dose": len(self.dose)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "pert": list(self.pert),
            "contexts": [list(c) for c in self.contexts],
            "batch": list(self.batch),
            "dose": list(self.dose),
            "context_keys": list(self.context_keys),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        return cls(
            pert=[str(x) for x in d["pert"]],
            contexts=[[str(x) for x in c] for c in d["contexts"]],
            batch=[str(x) for x in d.get("batch", [NONE])],
            dose=[str(x) for x in d.get("dose", [NONE])],
            context_keys=[str(x) for x in d.get("context_keys", [])],
        )

    def dose_numbers(self) -> list[float] | None:
        """log1p of each dose label's number (NaN for <none>), or None unless every real dose label is a number >= 0
        (the continuous dose encoding's inputs)."""
        values = [dose_number(d) for d in self.dose[1:]]
        if not values or any(v is None for v in values):
            return None
        return [float("nan"), *values]

    # -- encoding ----------------------------------------------------------------------------------------
    @property
    def perturbations(self) -> list[str]:
        """Perturbation parts with a learned embedding (seen in training)."""
        return [p for p in self.pert[2:] if p != UNKNOWN]

    def encode_pert(self, labels: Sequence[str], unknown: str = "error") -> np.ndarray:
        """[N, P] part indices; a part never seen in training raises DataError (never mapped silently),
        or, only when asked with ``unknown="generic"``, maps to the generic <unknown> token (logged)."""
        lookup = {p: i for i, p in enumerate(self.pert) if i > 0 and p != UNKNOWN}
        generic = self.pert.index(UNKNOWN) if unknown == "generic" and UNKNOWN in self.pert else None
        uniq, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        unseen = self.unseen_parts(uniq.tolist())
        if unseen and generic is None:
            raise unseen_error(unseen)
        rows = []
        for label in uniq.tolist():
            parts = [label] if label == self.control else pert_parts(label)
            if label in unseen and label not in _GENERIC_TOLD:  # told once per process, not at every validation
                _GENERIC_TOLD.add(label)
                logger.warning("perturbation %s (in %r) was not seen in training: using the generic perturbation "
                               "token", ", ".join(map(repr, unseen[label])), label)
            rows.append([lookup.get(q, generic) for q in parts])
        width = max([1, *map(len, rows)])
        table = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table[inverse.reshape(-1)]

    def unseen_parts(self, labels: Sequence[str]) -> dict[str, list[str]]:
        """{label: its parts without a learned or table embedding} for every label that has such parts."""
        lookup = {p for i, p in enumerate(self.pert) if i > 0 and p != UNKNOWN}
        out = {}
        for label in dict.fromkeys(map(str, labels)):
            parts = [label] if label == self.control else pert_parts(label)
            missing = [q for q in parts if q not in lookup] or ([] if parts else [label])
            if missing:
                out[label] = missing
        return out

    def _lookup(self, vocab: list[str], values, what: str, unknown: str) -> np.ndarray:
        """Index of each value in ``vocab[1:]``; unseen values raise (unknown="error") or map to 0."""
        values = pd.Series(values, dtype=object)
        missing_value = values.isna().to_numpy()
        idx = pd.Index(vocab[1:]).get_indexer(values.astype(str).to_numpy()) + 1
        bad = (idx == 0) & ~missing_value
        if bad.any() and unknown == "error":
            raise DataError(f"unknown {what} {values[bad].iloc[0]!r}: not in the vocabulary ({bad.sum()} value(s))")
        return idx.astype(np.int64)

    def encode(
        self,
        conditions: Sequence[Condition],
        batch_values: Sequence[Any] | None = None,
        dose_values: Sequence[Any] | None = None,
        unknown: str = "error",
        unknown_pert: str = "error",
    ) -> Covariates:
        """Integer covariates of conditions; unseen contexts/batches/doses raise or map to 0 (``unknown``)."""
        if unknown not in ("error", "unknown"):
            raise DataError(f"unknown= must be 'error' or 'unknown', got {unknown!r}")
        n = len(conditions)
        bad = [c for c in conditions if len(c[0]) != len(self.contexts)]
        if bad:
            raise DataError(f"context {list(bad[0][0])} has {len(bad[0][0])} values, expected {len(self.contexts)}")
        ctx = np.zeros((n, len(self.contexts)), dtype=np.int64)
        for j, vocab in enumerate(self.contexts):
            col = self.context_keys[j] if j < len(self.context_keys) else f"#{j}"
            ctx[:, j] = self._lookup(vocab, [c[0][j] for c in conditions], f"context value (column {col!r})", unknown)
        batch = np.zeros(n, dtype=np.int64)
        if batch_values is not None:
            batch = self._lookup(self.batch, list(batch_values), "batch", unknown)
        dose = np.zeros(n, dtype=np.int64)
        if dose_values is not None:
            dose = self._lookup(self.dose, list(dose_values), "dose", unknown)
        pert = self.encode_pert([c[1] for c in conditions], unknown_pert) if n else np.zeros((0, 1), dtype=np.int64)
        return Covariates(pert=pert, context=ctx, batch=batch, dose=dose)


_GENERIC_TOLD: set[str] = set()


def dose_number(label) -> float | None:
    """log1p of a dose label read as a number >= 0 (``"10"``, ``"0.5"``), else None."""
    try:
        v = float(str(label))
    except ValueError:
        return None
    return float(np.log1p(v)) if np.isfinite(v) and v >= 0 else None


def unseen_error(unseen: dict[str, list[str]], conditions: Sequence | None = None) -> DataError:
    """One line naming every perturbation (or condition) whose parts no route can represent, with the remedies."""
    parts = sorted({q for qs in unseen.values() for q in qs})
    if conditions:
        what = f"{len(conditions)} condition(s) {cond_labels(conditions)} hold"
    else:
        what = f"{len(unseen)} perturbation(s) {', '.join(unseen)} hold"
    return DataError(f"{what} perturbation part(s) never seen in training and covered by no prior or embedding "
                     f"table: {', '.join(parts)}",
                     python="train with a prior that covers them (model.pert_prior, e.g. 'knowledge') or a table "
                            "(model.pert_embedding), or predict them as the generic perturbation with "
                            "unknown_perturbations='generic'",
                     cli="train with a prior that covers them (--set model.pert_prior=knowledge) or a table "
                         "(--set model.pert_embedding=FILE), or predict them as the generic perturbation with "
                         "--unknown-perturbations generic")
