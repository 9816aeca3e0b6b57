"""Validation scores of benchmark runs, for choosing between configurations without looking at test conditions.

    python benchmarks/validation_table.py --work bench_work [--tags small-2k-v2,flow-noise-2k]

For each split and tag: mean ± sd over seeds of the validator's scores at each run's best checkpoint (the lowest
val_score, the score `train.val_select` picks by, the energy distance by default; what `predict` loads): val_ed
(lower is better) and val_pearson_delta, from the run's log.csv (written by training, so nothing is re-computed).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def validated_rows(log: Path) -> list[dict]:
    """The rows of a run's log.csv written at a validation (those with a val_score), in step order."""
    with open(log, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("val_score")]


def best_row(log: Path) -> dict | None:
    rows = validated_rows(log)
    return min(rows, key=lambda r: float(r["val_score"])) if rows else None


def fmt(values: list[float]) -> str:
    """mean ± sd over seeds; "—" where a score is undefined (NaN: no real DE gene, one condition in a context)."""
    if any(v != v for v in values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_work", help="working folder of real_benchmark.py runs")
    p.add_argument("--tags", help="comma-separated tags (default: all)")
    args = p.parse_args()
    want = set(args.tags.split(",")) if args.tags else None
    print("| split | tag | seeds | best step | val_ed | val_pearson_delta |")
    print("|---|---|---|---|---|---|")
    for split in sorted(d for d in Path(args.work).iterdir() if d.is_dir()):
        for tag in sorted(d for d in split.iterdir() if d.is_dir()):
            if want is not None and tag.name not in want:
                continue
            rows = [r for log in sorted(tag.glob("seed*/run/log.csv")) if (r := best_row(log)) is not None]
            if rows:
                print(f"| {split.name} | {tag.name} | {len(rows)} | {', '.join(r['step'] for r in rows)} | "
                      f"{fmt([float(r['val_ed']) for r in rows])} | "
                      f"{fmt([float(r['val_pearson_delta']) for r in rows])} |")


if __name__ == "__main__":
    main()
