"""Conditions and splits: which (context, perturbation) groups are train / val / test, as JSON (SPEC §1).

Drawing a split (``make_split`` and its strategies) is :mod:`perturbdiff.data._strategies`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perturbdiff._errors import DataError
from perturbdiff._io import atomic_write_json
from perturbdiff.data._keys import DataKeys

Context = tuple[str, ...]  # one value per context column
Condition = tuple[Context, str]  # ((context value per context column, ...), perturbation label)
SUBSETS = ("train", "val", "test")


def pert_parts(label: str) -> list[str]:
    """The parts of a perturbation label: ``"A+B"`` -> ``["A", "B"]`` (a single perturbation: itself)."""
    return [p for p in str(label).split("+") if p]


def label(cond: Condition) -> str:
    """A condition in plain values: ``CD14 Mono/IFNB`` (several context values joined by commas)."""
    ctx, pert = cond
    return f"{','.join(map(str, ctx))}/{pert}"


def labels(conds, limit: int = 20) -> str:
    """Every condition (up to ``limit``, then how many more), in plain values."""
    conds = list(conds)
    shown = ", ".join(label(c) for c in conds[:limit])
    return shown + (f" and {len(conds) - limit} more" if len(conds) > limit else "")


def obs_codes(obs: pd.DataFrame, col: str, *, required: bool = True) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 = missing) and string categories of one obs column, without per-cell string work."""
    if col not in obs.columns:
        raise DataError(f"obs has no column {col!r}; columns are: {', '.join(map(str, obs.columns))}")
    cat = pd.Categorical(obs[col])
    codes = np.asarray(cat.codes, dtype=np.int64)
    if required and (codes < 0).any():
        raise DataError(f"obs column {col!r} has {int((codes < 0).sum())} missing values")
    return codes, [str(c) for c in cat.categories]


def condition_codes(adata, keys: DataKeys) -> tuple[np.ndarray, list[Condition]]:
    """Per-cell condition code [N] and each code's condition (mixed-radix codes compressed by np.unique)."""
    cols = [obs_codes(adata.obs, c) for c in (*keys.context_keys, keys.pert_key)]
    code = np.zeros(adata.n_obs, dtype=np.int64)
    comp = np.zeros((1, 0), dtype=np.int64)  # component codes of each unique combination so far
    for c, cats in cols:
        k = max(len(cats), 1)
        uniq, code = np.unique(code * k + c, return_inverse=True)
        comp = np.column_stack([comp[uniq // k], uniq % k])
    conditions = [
        (tuple(cols[j][1][row[j]] for j in range(len(cols) - 1)), cols[-1][1][row[-1]]) for row in comp.tolist()
    ]
    return code.reshape(-1).astype(np.int64), conditions


def condition_labels(adata, keys: DataKeys) -> pd.Series:
    """Per-cell Condition: pd.Series of ``(context_tuple, perturbation)`` tuples (object dtype) on obs_names.

    Control cells get ``(context, control_value)``. Vectorised: only the unique conditions become tuples.
    """
    code, conditions = condition_codes(adata, keys)
    table = np.empty(len(conditions), dtype=object)
    for i, cond in enumerate(conditions):
        table[i] = cond
    return pd.Series(table[code], index=adata.obs_names, name="condition")


def _parse_condition(item: Any, n_ctx: int, where: str) -> Condition:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise DataError(f"{where}: a condition must be [context, perturbation], got {item!r}")
    ctx, pert = item
    ctx = (str(ctx),) if isinstance(ctx, str) else tuple(str(c) for c in ctx)
    if len(ctx) != n_ctx:
        raise DataError(f"{where}: context {list(ctx)} has {len(ctx)} values but there are {n_ctx} context columns")
    return ctx, str(pert)


@dataclass
class Split:
    """Train / val / test conditions; read and written in the JSON format of shared/benchmarks/README.md."""

    name: str
    pert_col: str
    control: str
    context_cols: list[str]
    train: list[Condition]
    val: list[Condition]
    test: list[Condition]
    test_n_cells: list[int] | None = None
    var_names: list[str] | None = None
    seed: int = 0
    strategy: str = ""
    dataset: str = ""
    source: str = ""
    preprocess: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown JSON keys, kept on write

    def subset(self, name: str) -> list[Condition]:
        """The conditions of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SUBSETS:
            raise DataError(f"unknown split subset {name!r}; choose one of {', '.join(SUBSETS)}")
        return list(getattr(self, name))

    # -- JSON --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "split") -> Split:
        missing = [k for k in ("pert_col", "control", "context_cols", "train", "val", "test") if k not in d]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        ctx_cols = [d["context_cols"]] if isinstance(d["context_cols"], str) else [str(c) for c in d["context_cols"]]
        conds = {s: [_parse_condition(c, len(ctx_cols), f"{where} {s}") for c in d[s]] for s in SUBSETS}
        n_cells = d.get("test_n_cells")
        if n_cells is not None and len(n_cells) != len(conds["test"]):
            raise DataError(
                f"{where}: test_n_cells has {len(n_cells)} entries for {len(conds['test'])} test conditions"
            )
        known = {
            "name",
            "dataset",
            "source",
            "pert_col",
            "context_cols",
            "control",
            "seed",
            "strategy",
            *SUBSETS,
            "test_n_cells",
            "preprocess",
            "var_names",
        }
        return cls(
            name=str(d.get("name", "")),
            pert_col=str(d["pert_col"]),
            control=str(d["control"]),
            context_cols=ctx_cols,
            **conds,
            test_n_cells=None if n_cells is None else [int(n) for n in n_cells],
            var_names=None if d.get("var_names") is None else [str(g) for g in d["var_names"]],
            seed=int(d.get("seed", 0)),
            strategy=str(d.get("strategy", "")),
            dataset=str(d.get("dataset", "")),
            source=str(d.get("source", "")),
            preprocess=str(d.get("preprocess", "")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: a context is a string with one context column, a list of strings otherwise."""
        one = len(self.context_cols) == 1

        def enc(conds: list[Condition]) -> list[list[Any]]:
            return [[ctx[0] if one else list(ctx), pert] for ctx, pert in conds]

        return {
            "name": self.name,
            "dataset": self.dataset,
            "source": self.source,
            "pert_col": self.pert_col,
            "context_cols": list(self.context_cols),
            "control": self.control,
            "seed": self.seed,
            "strategy": self.strategy,
            "train": enc(self.train),
            "val": enc(self.val),
            "test": enc(self.test),
            "test_n_cells": self.test_n_cells,
            "preprocess": self.preprocess,
            "var_names": self.var_names,
            **self.extra,
        }

    @classmethod
    def read(cls, path: str | Path) -> Split:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise DataError(f"split file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"split file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, where=f"split file {path}")

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    # -- validation --------------------------------------------------------------------------------------
    def check(self, adata, keys: DataKeys, *, need_test: bool = False) -> None:
        """Raise DataError if the columns disagree with ``keys``, subsets overlap, or train/val conditions are
        absent from ``adata``.

        Test conditions may have no cells in the file (conditions the user wants predicted, never measured; a
        benchmark's training file): only scoring them needs their cells, ``need_test=True``.
        """
        if self.pert_col != keys.pert_key:
            raise DataError(f"split pert_col {self.pert_col!r} differs from the data's pert_key {keys.pert_key!r}")
        if list(self.context_cols) != list(keys.context_keys):
            raise DataError(
                f"split context_cols {list(self.context_cols)} differ from the data's context_keys "
                f"{list(keys.context_keys)}"
            )
        if self.control != keys.control_value:
            raise DataError(f"split control {self.control!r} differs from the data's control {keys.control_value!r}")
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            overlap = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if overlap:
                raise DataError(f"{len(overlap)} condition(s) are both in {a} and {b}: {labels(overlap)}")
        _, present = condition_codes(adata, keys)
        present_set = set(present)
        if not any(p != keys.control_value for _, p in present):
            raise DataError(f"the data hold only {keys.control_value!r} cells in column {keys.pert_key!r}: "
                            "training needs the perturbed cells of the split's training conditions")
        for subset in ("train", "val", "test") if need_test else ("train", "val"):
            absent = [c for c in getattr(self, subset) if c not in present_set]
            if absent:
                raise DataError(f"{len(absent)} {subset} condition(s) of split {self.name!r} have no cells in the "
                                f"data: {labels(absent)}")

    def summary(self) -> str:
        """One line: name, strategy and the number of conditions per subset."""
        return (
            f"split {self.name!r} ({self.strategy or 'given'}): {len(self.train)} train, {len(self.val)} val,"
            f" {len(self.test)} test conditions"
        )


def training_mask(adata, keys: DataKeys, split: Split) -> np.ndarray:
    """Cells a model may learn from: the split's training conditions plus every control cell."""
    code, present = condition_codes(adata, keys)
    train = set(split.train)
    return np.isin(code, [i for i, (c, p) in enumerate(present) if (c, p) in train or p == keys.control_value])


def training_means(adata, keys: DataKeys, train) -> tuple[np.ndarray, list[Condition], np.ndarray]:
    """(per-cell condition code, the conditions present, [n_conditions, G] mean log1p row of each condition in
    ``train`` and of each control group; zero rows for the other conditions): the pseudobulks a model or baseline
    may learn from."""
    from perturbdiff.data._matrix import group_means

    codes, conds = condition_codes(adata, keys)
    train = set(train)
    keep = np.array([c in train or c[1] == keys.control_value for c in conds], dtype=bool)
    return codes, conds, group_means(adata.X, np.where(keep[codes], codes, -1), len(conds))


def condition_shifts(adata, keys: DataKeys, conditions) -> dict[Condition, np.ndarray]:
    """{condition: its pseudobulk minus its context's control pseudobulk} (log1p, [G] float64) for each of
    ``conditions`` present with control cells in its context, in the data's order (one pass: training_means)."""
    wanted = {(tuple(map(str, c)), str(p)) for c, p in conditions}
    _, conds, means = training_means(adata, keys, wanted)
    ctrl = {c: means[k] for k, (c, p) in enumerate(conds) if p == keys.control_value}
    return {c: means[k] - ctrl[c[0]] for k, c in enumerate(conds)
            if c in wanted and c[1] != keys.control_value and c[0] in ctrl}
