"""--threads auto: the count is chosen by timing, leaves no trace in the run, is recorded and resumed; fixed counts and
OMP_NUM_THREADS are obeyed."""

from __future__ import annotations

import time

import pytest
import torch

import perturbdiff._threads as threads
import perturbdiff.model._generate as generate_mod
import perturbdiff.train._loop as loop_mod
from perturbdiff import ConfigError, PerturbDiff
from perturbdiff._config_rules import guidance_weights
from perturbdiff.train import load_checkpoint
from test_train import _interrupt_at, planted_data, tiny_config


@pytest.fixture
def auto(monkeypatch):
    """The auto policy on a pretend 2-core machine without OMP_NUM_THREADS; torch's count restored afterwards."""
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    threads.set_threads("auto")
    yield
    threads.set_threads(None)
    torch.set_num_threads(n)


def test_parse_threads_takes_auto_or_a_positive_count():
    assert threads.parse_threads("auto") == "auto"
    assert threads.parse_threads("3") == 3 and threads.parse_threads(2) == 2
    assert threads.parse_threads(None) is None
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ConfigError, match="threads must be"):
            threads.parse_threads(bad)


def test_the_fewest_threads_within_ten_percent_of_the_fastest_win():
    assert threads.fewest_within({1: 1.0, 2: 0.5}) == 2
    assert threads.fewest_within({1: 1.05, 2: 1.0}) == 1  # a near tie goes to fewer threads
    assert threads.fewest_within({1: 0.3, 2: 1.2}) == 1  # the loaded-machine cliff
    assert threads.candidates(1) == [1] and threads.candidates(2) == [1, 2] and threads.candidates(16) == [1, 8, 16]


def test_calibrate_keeps_the_count_the_work_is_fastest_at(auto):
    def work():  # pretend two threads are 6x faster
        time.sleep(0.005 if torch.get_num_threads() == 2 else 0.03)

    assert threads.calibrate(work, "test") == 2 and torch.get_num_threads() == 2

    def loaded():  # and now that they fall off the cliff
        time.sleep(0.03 if torch.get_num_threads() == 2 else 0.005)

    assert threads.calibrate(loaded, "test", max_age=0.0) == 1 and torch.get_num_threads() == 1


def test_a_recent_choice_is_reused_without_timing_and_measured_again_later(auto):
    calls = []

    def work():
        calls.append(torch.get_num_threads())
        time.sleep(0.005 if torch.get_num_threads() == 2 else 0.03)

    assert threads.calibrate(work, "test") == 2
    n = len(calls)
    torch.set_num_threads(1)
    assert threads.calibrate(work, "test") == 2 and len(calls) == n and torch.get_num_threads() == 2
    assert threads.calibrate(work, "test", max_age=0.0) == 2 and len(calls) > n


def test_a_count_far_off_the_fastest_after_its_warm_up_is_not_timed_further(auto):
    calls = []

    def work():
        calls.append(torch.get_num_threads())
        time.sleep(0.002 if torch.get_num_threads() == 1 else 0.06)

    torch.set_num_threads(1)  # the untimed first call runs here
    seconds = threads.time_counts(work, [1, 2], rounds=3)
    assert calls.count(2) == 1 and seconds[2] > 10 * seconds[1]


def test_omp_num_threads_in_the_environment_turns_auto_off(auto, monkeypatch):
    assert threads.auto_active("cpu")
    assert not threads.auto_active("cuda")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not threads.auto_active("cpu")


def test_a_fixed_count_is_applied_at_once():
    n = torch.get_num_threads()
    try:
        threads.set_threads(1)
        assert torch.get_num_threads() == 1 and not threads.auto_active("cpu")
    finally:
        threads.set_threads(None)
        torch.set_num_threads(n)


def _spy(monkeypatch, keep: int = 1) -> list[str]:
    """Replace calibration by one that runs the probe (all its side effects) and then keeps ``keep`` threads for
    training (sampling's count is left as it is)."""
    calls: list[str] = []

    def fake(work, what, **_):
        for _ in range(3):
            work()
        if what == "training step":
            torch.set_num_threads(keep)
        calls.append(what)
        return keep

    monkeypatch.setattr(loop_mod, "calibrate", fake)
    monkeypatch.setattr(generate_mod, "calibrate", fake)
    return calls


def test_auto_measures_at_the_start_and_at_checkpoints_and_leaves_no_trace(tmp_path, monkeypatch, auto):
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=6, val_every=2, log_every=1)
    calls = _spy(monkeypatch)
    measured = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "a", progress=False)
    # training: at the start and at the checkpoints of steps 2 and 4 (not after the last); sampling: each validation
    # generation, one per candidate guidance weight (preset tiny chooses among several)
    per_check = len(guidance_weights(cfg.train.val_guidance)) or 1
    assert calls.count("training step") == 3 and calls.count("sampler step") == 3 * per_check
    assert load_checkpoint(tmp_path / "a" / "last.safetensors")[1]["state"]["threads"] == 1
    threads.set_threads(1)
    plain = PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path / "b", progress=False)
    for (k, v), w in zip(plain.network.state_dict().items(), measured.network.state_dict().values()):
        assert torch.equal(v, w), k  # the timed forward + backward passes changed nothing the run computes


def test_a_resumed_auto_run_continues_with_the_recorded_count(tmp_path, monkeypatch, auto):
    adata, split = planted_data(n_per_group=40)
    cfg = tiny_config(max_steps=4, val_every=4, log_every=1)
    calls = _spy(monkeypatch, keep=2)
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path, progress=False)
    assert calls == ["training step"]
    assert load_checkpoint(tmp_path / "last.safetensors")[1]["state"]["threads"] == 2
    calls.clear()
    torch.set_num_threads(1)
    PerturbDiff.from_config(cfg, adata, split).train(out_dir=tmp_path, progress=False)
    assert "training step" not in calls  # not measured again: the checkpoint's count is taken
    assert torch.get_num_threads() == 2

