"""benchmarks/gpu_check.py's logic on a CPU (the script itself is run on a CUDA machine when one is lent)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_measures_throughput_mfu_and_exact_resume_on_a_cpu(tmp_path, capsys):
    res = gpu_check.main(["--device", "cpu", "--presets", "tiny", "--genes", "32", "--seconds", "0.2",
                          "--peak-tflops", "0.1", "--out", str(tmp_path / "r.json")])
    (row,) = res["presets"]
    assert row["S"] == 32 and row["B"] == 16 and row["steps_per_s"] > 0 and row["sample_cells_per_s"] > 0
    assert 0 < row["mfu"] < 1 and abs(row["mfu"] - row["model_tflops"] / 0.1) < 1e-9
    assert row["sample_evals"] == 25  # the default sampler: 25 Euler steps
    assert res["resume"]["identical"] is True
    assert (tmp_path / "r.json").exists() and "| tiny | 32 × 16 |" in capsys.readouterr().out
