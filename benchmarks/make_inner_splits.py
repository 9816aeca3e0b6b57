"""Write benchmarks/splits/devel_combo_inner.json and devel_gbm_inner.json: the shared devel splits with more
validation conditions, taken from their training conditions by a fixed rule, for choosing between configurations.

The shared splits have one validation condition each, and on both it has no real DE gene (cell-eval calls none), so
their validation can judge the mean response but not the DE ranking, and not discrimination (two conditions per
context at least). The inner splits move training conditions that look like the test conditions into validation:

- ``devel_combo_inner``: every training double of the test context (k562) with a part that context never trained
  as a single (CBL+CNN1, SET+KLF1, SGK1+TBX3, ZBTB10+PTPN12), like five of the six test doubles;
- ``devel_gbm_inner``: a second held-out context with partial coverage, like the test's U87MG: in the first other
  context by name (A172), as many training conditions as the test has (5), drawn with seed 0.

Test conditions and genes stay the shared split's. A choice made on an inner split's validation is then reported on
the shared split (trained on all its training conditions); an inner split's own test rows are never a result.

    python benchmarks/make_inner_splits.py      # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def combo_moved(split: dict) -> list[list[str]]:
    """The test context's training doubles holding a part it never trained as a single."""
    (ctx,) = {c for c, _ in split["test"]}
    singles = {p for c, p in split["train"] if c == ctx and "+" not in p}
    return [[c, p] for c, p in split["train"] if c == ctx and "+" in p and not set(p.split("+")) <= singles]


def gbm_moved(split: dict, seed: int = 0) -> list[list[str]]:
    """As many training conditions as the test has, drawn in the first other context by name."""
    (ctx,) = {c for c, _ in split["test"]}
    other = sorted({c for c, _ in split["train"]} - {ctx})[0]
    pool = [[c, p] for c, p in split["train"] if c == other]
    pick = np.random.default_rng(seed).choice(len(pool), size=len(split["test"]), replace=False)
    return [pool[i] for i in sorted(pick)]


def inner(split: dict, moved: list[list[str]], name: str) -> dict:
    out = dict(split, name=name)
    out["train"] = [c for c in split["train"] if c not in moved]
    out["val"] = split["val"] + moved
    return out


def main() -> None:
    from perturbdiff._io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(HERE / "splits"))
    args = ap.parse_args()
    for name, rule in (("devel_combo", combo_moved), ("devel_gbm", gbm_moved)):
        split = json.loads((Path(args.shared) / "benchmarks" / f"{name}.json").read_text())
        moved = rule(split)
        path = Path(args.out) / f"{name}_inner.json"
        atomic_write_json(path, inner(split, moved, f"{name}_inner"))
        print(f"{path}: validation {split['val'] + moved}; {len(split['train']) - len(moved)} train conditions")


if __name__ == "__main__":
    main()
