"""benchmarks/early_stop_sim.py: the stopping rule replayed on a run's validation log."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from early_stop_sim import replay, validations  # noqa: E402

LOG = [(500, 3.0), (1000, 2.0), (1500, 2.5), (2000, 2.6), (2500, 1.0)]


def test_patience_stops_after_that_many_validations_without_a_better_score():
    assert replay(LOG, 1) == (1500, 1000)
    assert replay(LOG, 2) == (2000, 1000)  # the better score at 2,500 comes too late
    assert replay(LOG, 3) == (2500, 2500)  # never stops: the full run's choice
    assert replay(LOG, len(LOG)) == (2500, 2500)


def test_validations_reads_only_the_rows_that_validated(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss,val_score\n50,0.3,\n500,0.2,1.5\n550,0.2,\n1000,0.1,1.25\n")
    assert validations(log) == [(500, 1.5), (1000, 1.25)]
