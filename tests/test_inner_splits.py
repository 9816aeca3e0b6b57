"""The rules of benchmarks/make_inner_splits.py: which training conditions become validation conditions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from make_inner_splits import combo_moved, gbm_moved, inner  # noqa: E402

COMBO = {
    "train": [["a", "X"], ["a", "X+Y"], ["k", "A"], ["k", "B"], ["k", "A+B"], ["k", "A+C"], ["k", "C+D"],
              ["k", "X"]],
    "val": [["k", "A+X"]],
    "test": [["k", "E+F"], ["k", "A+E"]],
}


def test_combo_rule_moves_the_test_contexts_doubles_with_a_part_it_never_trained_alone():
    # A+B: both trained alone in k (kept); A+C, C+D: C and D never alone in k; X+Y is another context's
    assert combo_moved(COMBO) == [["k", "A+C"], ["k", "C+D"]]


def test_gbm_rule_draws_as_many_conditions_as_the_test_has_in_the_first_other_context():
    split = {"train": [["u", "P1"], ["b", "P1"], ["b", "P2"], ["a", "P1"], ["a", "P2"], ["a", "P3"], ["a", "P4"]],
             "val": [["u", "P5"]], "test": [["u", "P2"], ["u", "P3"]]}
    moved = gbm_moved(split, seed=0)
    assert len(moved) == 2 and all(c == "a" for c, _ in moved)
    assert moved == gbm_moved(split, seed=0) and moved == sorted(moved, key=split["train"].index)


def test_an_inner_split_keeps_every_condition_once_and_the_test_unchanged():
    moved = combo_moved(COMBO)
    out = inner(COMBO, moved, "combo_inner")
    assert out["name"] == "combo_inner" and out["test"] == COMBO["test"]
    assert out["val"] == COMBO["val"] + moved
    assert not any(c in out["train"] for c in out["val"])
    assert sorted(out["train"] + out["val"]) == sorted(COMBO["train"] + COMBO["val"])
