"""Where one configuration stands against the bars of issues 14 and 17, over every seed it was run with.

    python benchmarks/standing.py --work bench_work --tags auto,fast,oldcode

Reads the test rows (``result.json``) that real_benchmark.py wrote under ``<work>/<split>/<tag>/seed<k>/``. Several
tags may name the same configuration, e.g. one trained by two versions of the code that compute the same function
(their runs of one seed drift apart through rounding, so they are separate draws). A row that repeats another to the
digit (a run reproduced) counts once. For each bar it prints mean ± sd, mean − sd, and whether mean − sd clears the
bar (the issues' criterion). Test rows are a record: nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

#: (split, metric, bar, who sets it) from shared/benchmarks/PEERS.md and the issues' targets
BARS = [
    ("kang_celltype", "pearson_delta", 0.900, "additive"),
    ("kang_celltype", "r2", 0.905, "additive"),
    ("kang_celltype", "pr_auc", 0.373, "STATE"),
    ("kang_celltype", "roc_auc", 0.812, "STATE"),
    ("devel_gbm", "pearson_delta", 0.241, "linear"),
    ("devel_gbm", "r2", 0.937, "linear"),
    ("devel_gbm", "discrimination_score_l1", 0.60, "issue 17"),
    ("devel_gbm", "discrimination_score_l2", 0.60, "issue 17"),
    ("devel_gbm", "discrimination_score_cosine", 0.60, "issue 17"),
    ("devel_combo", "pearson_delta", 0.247, "additive"),
    ("devel_combo", "pr_auc", 0.138, "STATE"),
    ("devel_combo", "roc_auc", 0.838, "STATE"),
    ("devel_unseen", "pearson_delta", 0.403, "train_mean, issue 14"),
    ("devel_unseen", "pearson_delta", 0.413, "linear"),
    ("devel_unseen", "r2", 0.964, "train_mean, issue 14"),
    ("devel_unseen", "r2", 0.969, "linear"),
]  # devel_unseen: this project's split (benchmarks/splits), baselines from real_benchmark.py's baselines.json


SAME_RUN = ("pearson_delta", "r2", "mse", "pr_auc", "roc_auc")  # a rerun that reproduces a run to the digit


def rows(work: Path, split: str, tags: list[str]) -> list[dict]:
    """Every test row of the tags, a row that repeats another to the digit (the same run reproduced) once."""
    out, seen = [], set()
    for tag in tags:
        for path in sorted((work / split / tag).glob("seed*/result.json")):
            row = json.loads(path.read_text())
            key = tuple(repr(row.get(k)) for k in SAME_RUN)
            if key not in seen:
                seen.add(key)
                out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench_work", type=Path)
    ap.add_argument("--tags", required=True, help="comma-separated tags of one configuration, in order of preference")
    args = ap.parse_args()
    tags = args.tags.split(",")
    print("| split | metric | bar | seeds | mean ± sd | mean − sd | clears |")
    print("|---|---|---|---|---|---|---|")
    for split, metric, bar, who in BARS:
        found = rows(args.work, split, tags)
        v = np.array([r[metric] for r in found if r.get(metric) is not None], float)
        v = v[np.isfinite(v)]
        if len(v) < 2:
            print(f"| {split} | {metric} | {bar:.3f} ({who}) | {len(v)} | — | — | — |")
            continue
        m, sd = v.mean(), v.std(ddof=1)
        print(f"| {split} | {metric} | {bar:.3f} ({who}) | {len(v)} | {m:.3f} ± {sd:.3f} | {m - sd:.3f} | "
              f"{'yes' if m - sd > bar else '**no**'} |")


if __name__ == "__main__":
    main()
