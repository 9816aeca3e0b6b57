"""Would early stopping have saved time? Replayed on the validation logs of finished runs, nothing trained.

    python benchmarks/early_stop_sim.py --work bench_work --tags auto,fast,fast2,fast3,oldcode [--patience 1,2,3]

For every finished run of the tags (``<work>/<split>/<tag>/seed*/run/log.csv``, validated up to its last step), a
rule "stop after p validations without a better val_score" is replayed: the step it stops at, and whether the
checkpoint it keeps is the one the full run chose. Per split: how many runs, where the full runs' best steps fall,
and per patience the mean stopping step and the share of runs that keep their checkpoint (docs/PERFORMANCE.md,
"The training loop's overheads").
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_table import validated_rows  # noqa: E402


def replay(vals: list[tuple[int, float]], patience: int) -> tuple[int, int]:
    """(step the rule stops at, step of the checkpoint it keeps) over one run's (step, val_score), lower better."""
    best, since = vals[0], 0
    for step, score in vals[1:]:
        if score < best[1]:
            best, since = (step, score), 0
        else:
            since += 1
            if since >= patience:
                return step, best[0]
    return vals[-1][0], best[0]


def validations(log: Path) -> list[tuple[int, float]]:
    """(step, val_score) of every validation in a run's log.csv."""
    return [(int(r["step"]), float(r["val_score"])) for r in validated_rows(log)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench_work"), help="real_benchmark.py's working folder")
    ap.add_argument("--tags", required=True, help="comma-separated run tags (one configuration)")
    ap.add_argument("--patience", default="1,2,3")
    args = ap.parse_args()
    tags, patiences = args.tags.split(","), [int(p) for p in args.patience.split(",")]
    runs: dict[str, list] = collections.defaultdict(list)
    for log in sorted(args.work.glob("*/*/seed*/run/log.csv")):
        split, tag = log.parts[-5], log.parts[-4]
        vals = validations(log) if tag in tags else []
        if len(vals) > 1:
            runs[split].append(vals)
    for split, logs in sorted(runs.items()):
        full = [replay(v, len(v))[1] for v in logs]  # patience past the end: the full run's choice
        last = sum(v[-1][0] for v in logs) / len(logs)
        print(f"{split}: {len(logs)} runs, best steps {sorted(collections.Counter(full).items())}")
        for p in patiences:
            stops, kept = zip(*(replay(v, p) for v in logs))
            same = sum(k == f for k, f in zip(kept, full))
            print(f"  patience {p}: stops at {sum(stops) / len(stops):.0f} of {last:.0f} steps on average, "
                  f"keeps the full run's checkpoint in {same} of {len(logs)}")


if __name__ == "__main__":
    main()
