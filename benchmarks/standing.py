"""Where one configuration stands against the bars of issues 14 and 17, over every seed it was run with.

    python benchmarks/standing.py --work bench_work --tags auto,fast,oldcode

Reads the test rows (``result.json``) that real_benchmark.py wrote under ``<work>/<split>/<tag>/seed<k>/``. Several
tags may name the same configuration, e.g. one trained by two versions of the code that compute the same function
(their runs of one seed drift apart through rounding, so they are separate draws). A row that repeats another to the
digit (a run reproduced) counts once. The bars come from shared/benchmarks/PEERS.md ("What PerturbDiff has to
beat"), from this project's baselines on its own split (``<work>/devel_unseen/baselines.json``), and issue 17's
discrimination bar. For each bar it prints mean ± sd, mean − sd, and whether mean − sd clears the bar (the issues'
criterion). Test rows are a record: nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, collect, read_peers  # noqa: E402

#: (split, result key, PEERS.md column, who sets the bar); a number is a bar of its own (issue 17's discrimination)
BARS = [
    ("kang_celltype", "pearson_delta", "pearson_Δ", "additive"),
    ("kang_celltype", "r2", "R²", "additive"),
    ("kang_celltype", "overlap_at_N", "overlap@N", "additive"),
    ("kang_celltype", "pr_auc", "pr_auc", "state"),
    ("kang_celltype", "roc_auc", "roc_auc", "state"),
    ("devel_gbm", "pearson_delta", "pearson_Δ", "linear"),
    ("devel_gbm", "r2", "R²", "linear"),
    ("devel_gbm", "discrimination_score_l1", "pds_l1", 0.60),
    ("devel_gbm", "discrimination_score_l2", "pds_l2", 0.60),
    ("devel_gbm", "discrimination_score_cosine", "pds_cos", 0.60),
    ("devel_combo", "pearson_delta", "pearson_Δ", "additive"),
    ("devel_combo", "discrimination_score_cosine", "pds_cos", "additive"),
    ("devel_combo", "pr_auc", "pr_auc", "state"),
    ("devel_combo", "roc_auc", "roc_auc", "state"),
    ("devel_unseen", "pearson_delta", None, "train_mean"),  # this project's split: issue 14's baselines
    ("devel_unseen", "pearson_delta", None, "linear"),
    ("devel_unseen", "r2", None, "train_mean"),
    ("devel_unseen", "r2", None, "linear"),
]


def rows(entry: dict, tags: list[str]) -> list[dict]:
    """Every test row of the tags in one split's ``collect`` entry, a row that repeats another to the digit (the
    same run reproduced) once."""
    out, seen = [], set()
    for tag in tags:
        for row in entry["tags"].get(tag, []):
            key = tuple(repr(row.get(k)) for k in ("pearson_delta", "r2", "mse", "pr_auc", "roc_auc"))
            if key not in seen:
                seen.add(key)
                out.append(row)
    return out


def bar(split: str, key: str, column: str | None, who, peers: dict, entry: dict) -> tuple[float, str]:
    """The bar's value and its source: a fixed number, a PEERS.md row, or this project's baseline on its split."""
    if isinstance(who, float):
        return who, "issue 17"
    if column is not None:
        return peers[split][who][column], f"{who}, PEERS.md"
    return entry["baselines"][who][key], f"{who}, our baseline"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench_work", type=Path)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--tags", required=True, help="comma-separated tags of one configuration, in order of preference")
    args = ap.parse_args()
    tags, peers, runs = args.tags.split(","), read_peers(Path(args.shared)), collect(args.work)
    print("| split | metric | bar | runs | mean ± sd | mean − sd | clears |")
    print("|---|---|---|---|---|---|---|")
    for split, key, column, who in BARS:
        entry = runs.get(split, {"tags": {}, "baselines": {}})
        value, source = bar(split, key, column, who, peers, entry)
        v = np.array([r[key] for r in rows(entry, tags) if r.get(key) is not None], float)
        v = v[np.isfinite(v)]
        if len(v) < 2:
            print(f"| {split} | {key} | {value:.3f} ({source}) | {len(v)} | — | — | — |")
            continue
        m, sd = v.mean(), v.std(ddof=1)
        print(f"| {split} | {key} | {value:.3f} ({source}) | {len(v)} | {m:.3f} ± {sd:.3f} | {m - sd:.3f} | "
              f"{'yes' if m - sd > value else '**no**'} |")


if __name__ == "__main__":
    main()
