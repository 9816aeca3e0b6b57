"""benchmarks/standing.py: every run of a configuration counts, a run reproduced to the digit only once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_benchmark import collect  # noqa: E402
from standing import rows  # noqa: E402


def write(work: Path, tag: str, seed: int, pearson: float) -> None:
    folder = work / "devel_gbm" / tag / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"pearson_delta": pearson, "r2": 0.9, "mse": 0.01}))


def test_a_reproduced_run_counts_once_and_other_draws_of_a_seed_count(tmp_path):
    write(tmp_path, "old", 0, 0.40)
    write(tmp_path, "old", 1, 0.30)
    write(tmp_path, "rerun", 0, 0.40)  # the same run reproduced to the digit
    write(tmp_path, "new", 0, 0.45)  # seed 0 under other code: another draw
    got = sorted(r["pearson_delta"] for r in rows(collect(tmp_path)["devel_gbm"], ["old", "rerun", "new"]))
    assert got == [0.30, 0.40, 0.45]
