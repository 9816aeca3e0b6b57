"""Regression tests of the correctness review (issue 11): leakage-free gene selection, gene alignment, every input
checked before work starts, run directories that are never damaged, and a command line a new user can follow."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pytest

from perturbdiff import Config, ConfigError, DataError, OutputError
from perturbdiff.cli import main
from perturbdiff.data import DataKeys, Split, get_record, make_split, preprocess, training_mask
from perturbdiff.datasets import simulate

KEYS = DataKeys("perturbation", "control", ("cell_type",), "counts", batch_key="batch")
RAW_FLAGS = ["--pert-key", "perturbation", "--control-value", "control", "--context-keys", "cell_type"]
TINY = ["--preset", "tiny", "--max-steps", "4", "--set", "train.val_every=2", "--set", "data.set_size=16",
        "--no-progress"]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> bool:
    """One line saying what is wrong (log lines before it are fine), no traceback."""
    return sum("error:" in ln for ln in err.splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """raw.h5ad -> split (on the raw file) -> preprocess --split -> a 4-step tiny run, all through the CLI."""
    d = tmp_path_factory.mktemp("flow")
    raw = simulate(600, 300, n_cell_types=3, n_batches=2, n_perturbations=6, n_combos=2, seed=1)
    raw.write_h5ad(d / "raw.h5ad")
    assert main(["split", str(d / "raw.h5ad"), *RAW_FLAGS, "--strategy", "held-out-contexts-partial",
                 "--holdout", "CT2", "--seed", "0", "--out", str(d / "split.json")]) == 0
    assert main(["preprocess", str(d / "raw.h5ad"), *RAW_FLAGS, "--batch-key", "batch", "--input-kind", "counts",
                 "--n-hvg", "100", "--split", str(d / "split.json"), "--out", str(d / "data.h5ad")]) == 0
    assert main(["train", str(d / "data.h5ad"), "--split", str(d / "split.json"), *TINY,
                 "--out", str(d / "run")]) == 0
    return d, raw


# -- 1. genes chosen on training cells only ---------------------------------------------------------------------
def test_split_on_the_raw_file_and_genes_from_training_cells_only(flow):
    d, raw = flow
    doc = json.loads((d / "split.json").read_text())
    assert doc["var_names"] is None  # never written into a split that did not come with them
    split = Split.read(d / "split.json")
    genes = get_record(ad.read_h5ad(d / "data.h5ad"))["genes"]
    on_train = preprocess(raw, KEYS, n_hvg=100, train_mask=training_mask(raw, KEYS, split)).var_names.tolist()
    on_all = preprocess(raw, KEYS, n_hvg=100).var_names.tolist()
    assert genes == on_train
    assert set(on_all) != set(on_train)  # the leak the split-first order removes is real on this data
    assert preprocess(raw, KEYS, n_hvg=100, split=split).var_names.tolist() == on_train  # the Python route


def test_train_warns_when_held_out_cells_chose_the_genes(flow):
    d, raw = flow
    split = Split.read(d / "split.json")
    leaky = preprocess(raw, KEYS, n_hvg=100)  # HVGs of every cell, test cells included
    from perturbdiff import PerturbDiff

    with pytest.warns(UserWarning, match="held-out cells shaped the gene selection"):
        PerturbDiff.from_config(Config.from_preset("tiny"), leaky, split)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PerturbDiff.from_config(Config.from_preset("tiny"), ad.read_h5ad(d / "data.h5ad"), split)


def test_split_of_a_raw_file_needs_its_columns(flow, tmp_path, capsys):
    d, _ = flow
    code, _, err = _run(["split", d / "raw.h5ad", "--strategy", "held-out-contexts", "--out", tmp_path / "s.json"],
                        capsys)
    assert code == 2 and "--pert-key, --control-value and --context-keys" in err
    assert not (tmp_path / "s.json").exists()


# -- 3. predict --data matches genes by name ----------------------------------------------------------------------
def test_predict_data_matches_genes_by_name(flow, tmp_path, capsys):
    d, _ = flow
    data = ad.read_h5ad(d / "data.h5ad")
    order = np.random.default_rng(0).permutation(data.n_vars)
    data[:, order].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    base = ["predict", d / "run", "--split", d / "split.json", "--no-progress"]
    assert _run([*base, "--data", d / "data.h5ad", "--out", tmp_path / "a.h5ad"], capsys)[0] == 0
    assert _run([*base, "--data", tmp_path / "shuffled.h5ad", "--out", tmp_path / "b.h5ad"], capsys)[0] == 0
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert list(b.var_names) == list(a.var_names)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())

    dropped = data.var_names[:10].tolist()
    data[:, 10:].copy().write_h5ad(tmp_path / "partial.h5ad")
    code, _, err = _run([*base, "--data", tmp_path / "partial.h5ad", "--out", tmp_path / "c.h5ad"], capsys)
    assert code == 2 and _one_error(err)
    assert "10 of 100" in err and dropped[0] in err and "--missing-genes zero" in err and "missing_genes=" not in err
    assert not (tmp_path / "c.h5ad").exists()
    code, _, err = _run([*base, "--data", tmp_path / "partial.h5ad", "--missing-genes", "zero",
                         "--out", tmp_path / "c.h5ad"], capsys)
    assert code == 0 and "10 of 100 genes (10%) are missing and filled with zeros" in err


# -- 9. test conditions without cells -----------------------------------------------------------------------------
def test_a_training_file_without_the_test_cells_trains_and_predicts(flow, tmp_path, capsys):
    d, raw = flow
    data = ad.read_h5ad(d / "data.h5ad")
    split = Split.read(d / "split.json")
    test = set(split.test)
    keep = [((c,), p) not in test for c, p in zip(data.obs["cell_type"], data.obs["perturbation"])]
    data[np.asarray(keep)].copy().write_h5ad(tmp_path / "train_only.h5ad")
    raw_keep = [((c,), p) not in test for c, p in zip(raw.obs["cell_type"], raw.obs["perturbation"])]
    raw[np.asarray(raw_keep)].copy().write_h5ad(tmp_path / "raw_train_only.h5ad")
    assert _run(["preprocess", tmp_path / "raw_train_only.h5ad", *RAW_FLAGS, "--input-kind", "counts", "--n-hvg",
                 "100", "--split", d / "split.json", "--out", tmp_path / "prep.h5ad"], capsys)[0] == 0
    assert _run(["train", tmp_path / "train_only.h5ad", "--split", d / "split.json", *TINY,
                 "--out", tmp_path / "run"], capsys)[0] == 0
    code, _, _ = _run(["predict", tmp_path / "run", "--data", tmp_path / "train_only.h5ad", "--n-cells", "8",
                       "--no-progress", "--out", tmp_path / "pred.h5ad"], capsys)
    assert code == 0
    code, _, err = _run(["evaluate", tmp_path / "pred.h5ad", "--data", tmp_path / "train_only.h5ad",
                         "--split", d / "split.json", "--out", tmp_path / "eval"], capsys)
    assert code == 2 and "scoring needs the real cells" in err and "CT2/" in err


def test_val_and_test_overlap_is_refused(flow):
    d, _ = flow
    split = Split.read(d / "split.json")
    split.val.append(split.test[0])
    with pytest.raises(DataError, match="both in val and test"):
        split.check(ad.read_h5ad(d / "data.h5ad"), KEYS)


# -- the config, validated before any work ------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("sample.start=fulll", "sample.start = 'fulll' (one of full, truncated)"),
    ("train.lr=abc", "'train.lr' needs a number, got 'abc'"),
    ("model.qk_norm=maybe", "'model.qk_norm' needs true or false"),
    ("train.max_steps=0", "train.max_steps = 0 (at least 1)"),
    ("data.set_size=-3", "data.set_size = -3"),
    ("sample.guidance=-1.5", "sample.guidance = -1.5 (>= -1"),
])
def test_bad_config_values_fail_before_any_work(flow, tmp_path, capsys, override, message):
    d, _ = flow
    code, _, err = _run(["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--set", override,
                         "--out", tmp_path / "run"], capsys)
    assert code == 2 and message in err and _one_error(err)
    assert not any((tmp_path / "run").glob("*"))  # nothing written


def test_booleans_are_parsed_strictly():
    assert Config().update({"model.qk_norm": "False"}).model.qk_norm is False
    assert Config().update({"model.qk_norm": "true"}).model.qk_norm is True
    with pytest.raises(ConfigError, match="true or false"):
        Config().update({"model.qk_norm": 2.5})


def test_counts_of_zero_are_refused(flow, tmp_path, capsys):
    d, _ = flow
    for flag in ("--n-samples", "--n-cells", "--steps"):
        code, _, err = _run(["predict", d / "run", "--data", d / "data.h5ad", flag, "0", "--out",
                             tmp_path / "p.h5ad"], capsys)
        assert code == 2 and f"{flag} must be at least 1" in err
    code, _, err = _run(["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--max-steps", "0",
                         "--out", tmp_path / "r"], capsys)
    assert code == 2 and "train.max_steps = 0" in err
    for n in ("0", "-5"):
        code, _, err = _run(["preprocess", d / "raw.h5ad", *RAW_FLAGS, "--input-kind", "counts", "--n-hvg", n,
                             "--out", tmp_path / "x.h5ad"], capsys)
        assert code == 2 and "--n-hvg must be at least 1" in err and not (tmp_path / "x.h5ad").exists()


# -- run directories ----------------------------------------------------------------------------------------------
def test_incompatible_resume_fails_before_anything_is_written(flow, tmp_path, capsys):
    d, _ = flow
    run = tmp_path / "run"
    assert _run(["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--out", run], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = _run(["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--set", "model.hidden=32",
                         "--out", run], capsys)
    assert code == 2 and _one_error(err)
    assert "model.hidden 64 -> 32" in err and "--no-resume" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.toml and split.json untouched
    other = Split.read(d / "split.json")
    other.name = "another"
    other.write(tmp_path / "other.json")
    code, _, err = _run(["train", d / "data.h5ad", "--split", tmp_path / "other.json", *TINY, "--out", run], capsys)
    assert code == 2 and "its split differs" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_rerunning_a_finished_run_says_so_and_more_steps_resume(flow, tmp_path, capsys, caplog):
    d, _ = flow
    args = ["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--out", tmp_path / "run"]
    assert _run(args, capsys)[0] == 0
    code, out, err = _run(args, capsys)
    assert code == 0 and "nothing to train: the run had already reached step 4" in out
    assert "already reached step 4 of 4" in err
    code, out, err = _run([*args, "--max-steps", "6"], capsys)
    assert code == 0 and "trained steps 5-6 (resumed at step 4)" in out
    assert "resuming" in err and "step 4 of 6" in err


def test_temp_files_are_cleaned_and_best_stands_in_for_a_missing_last(flow, tmp_path, capsys):
    d, _ = flow
    run = tmp_path / "run"
    args = ["train", d / "data.h5ad", "--split", d / "split.json", *TINY, "--out", run]
    assert _run([*args, "--max-steps", "2"], capsys)[0] == 0
    (run / "last.safetensors").unlink()  # as if the first `last` write had been killed
    (run / ".last.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)
    code, out, err = _run(args, capsys)
    assert code == 0 and not list(run.glob("*.tmp"))
    assert "resuming from best.safetensors" in err and "resumed at step 2" in out


def test_unwritable_outputs_are_found_before_the_work(flow, tmp_path, capsys, monkeypatch):
    d, _ = flow
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(["train", d / "data.h5ad", "--split", d / "split.json", *TINY,
                         "--out", tmp_path / "afile" / "run"], capsys)
    assert code == 2 and "cannot write to" in err and _one_error(err)

    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))  # a full disk
    code, _, err = _run(["predict", d / "run", "--data", d / "data.h5ad", "--out", tmp_path / "p.h5ad"], capsys)
    assert code == 2 and "not enough free disk space" in err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "p.h5ad").exists()
    with pytest.raises(OutputError, match="not enough free disk space"):
        from perturbdiff import PerturbDiff

        model = PerturbDiff.from_config(Config.from_preset("tiny"), ad.read_h5ad(d / "data.h5ad"),
                                        Split.read(d / "split.json"))
        model.train(out_dir=tmp_path / "py_run", progress=False)


# -- prediction problems known from the split, at train time --------------------------------------------------------
def test_unrepresentable_test_conditions_are_named_at_train_time(tmp_path, capsys):
    raw = simulate(400, 60, n_cell_types=2, n_batches=1, n_perturbations=4, n_combos=1, seed=2)
    keys = DataKeys("perturbation", "control", ("cell_type",), "counts")
    split = make_split(raw, keys, "held-out-perturbations", holdout=["G0047", "G0058"], seed=0)
    preprocess(raw, keys, n_hvg=60, split=split).write_h5ad(tmp_path / "data.h5ad")
    split.write(tmp_path / "split.json")
    code, _, err = _run(["train", tmp_path / "data.h5ad", "--split", tmp_path / "split.json", *TINY,
                         "--max-steps", "1", "--out", tmp_path / "run"], capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if "known before training" in ln]
    assert len(lines) == 1, err
    for ctx, pert in split.test:
        assert f"{ctx[0]}/{pert}" in lines[0]  # every condition, in plain values
    assert "['" not in lines[0] and "--unknown-perturbations generic" in lines[0]
    code, _, err = _run(["predict", tmp_path / "run", "--data", tmp_path / "data.h5ad", "--out",
                         tmp_path / "p.h5ad"], capsys)
    assert code == 2 and all(f"{c[0]}/{p}" in err for c, p in split.test)


# -- bad data ---------------------------------------------------------------------------------------------------
def test_duplicate_cell_names_are_made_unique_with_a_warning():
    raw = simulate(200, 40, n_cell_types=2, n_batches=1, n_perturbations=3, n_combos=0, seed=3)
    raw.obs_names = ["cell"] * 100 + [f"c{i}" for i in range(100)]
    with pytest.warns(UserWarning, match="99 cell names repeat an earlier one"):
        out = preprocess(raw, DataKeys("perturbation", "control", ("cell_type",), "counts"), n_hvg=40)
    assert out.obs_names.is_unique


def test_only_controls_no_cells_and_a_misspelled_control(tmp_path, capsys):
    raw = simulate(200, 40, n_cell_types=2, n_batches=1, n_perturbations=3, n_combos=0, seed=3)
    ctrl = raw[(raw.obs["perturbation"] == "control").to_numpy()].copy()
    ctrl.write_h5ad(tmp_path / "ctrl.h5ad")
    raw[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    raw.write_h5ad(tmp_path / "raw.h5ad")
    split = ["split", "--strategy", "held-out-contexts", "--out", tmp_path / "s.json"]
    code, _, err = _run([split[0], tmp_path / "ctrl.h5ad", *RAW_FLAGS, *split[1:]], capsys)
    assert code == 2 and "only 'control' cells" in err
    code, _, err = _run([split[0], tmp_path / "empty.h5ad", *RAW_FLAGS, *split[1:]], capsys)
    assert code == 2 and "no cells" in err
    flags = ["--pert-key", "perturbation", "--control-value", "Control", "--context-keys", "cell_type"]
    code, _, err = _run([split[0], tmp_path / "raw.h5ad", *flags, *split[1:]], capsys)
    assert code == 2 and "did you mean 'control'" in err


def test_a_warning_is_shown_once(capsys):
    from perturbdiff._logging import end_cli_logging, setup_cli_logging, warn

    setup_cli_logging()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn("collapsed predictions")
        assert not caught  # under the CLI a log line only, not also a Python warning
        assert capsys.readouterr().err.count("collapsed predictions") == 1
    finally:
        end_cli_logging()
        logging.getLogger("perturbdiff").handlers[:] = [logging.NullHandler()]
    with pytest.warns(UserWarning, match="collapsed"):
        warn("collapsed predictions")


# -- the command line -------------------------------------------------------------------------------------------
def test_help_imports_no_heavy_library_and_version():
    code = ("import sys, contextlib, io\n"
            "from perturbdiff.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'examples:' in out.getvalue() and 'perturbdiff config' in out.getvalue()\n"
            "heavy = [m for m in ('torch', 'anndata', 'scanpy', 'pandas') if m in sys.modules]\n"
            "print(heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "perturbdiff.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("perturbdiff ")


def test_config_command_prints_the_resolved_config_and_the_keys(capsys):
    code, out, _ = _run(["config", "--preset", "small", "--set", "model.qk_norm=false"], capsys)
    assert code == 0
    cfg = Config.from_dict(__import__("tomllib").loads(out))
    assert cfg.preset == "small" and cfg.model.hidden == 128 and cfg.model.qk_norm is False
    code, out, _ = _run(["config", "--keys"], capsys)
    assert code == 0 and "sample.start = 'full'" in out and "train.ema_warmup = True" in out


def test_help_shows_defaults_and_checkpoint_rules(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "resuming:" in out and "last.safetensors is written every train.val_every steps" in out
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    assert "(default: 2000)" in " ".join(capsys.readouterr().out.split())


def test_the_collapse_warning_names_the_cli_flag_under_the_cli(capsys):
    from perturbdiff import collapse_diagnostic
    from perturbdiff._logging import end_cli_logging, setup_cli_logging
    from test_apply import handmade

    base = np.linspace(0.0, 1.0, 12)
    shift = np.sin(np.arange(12.0))
    pred = handmade({"A": shift, "B": 1.01 * shift, "C": 0.99 * shift}, base)  # three near-identical responses
    setup_cli_logging()
    try:
        collapse_diagnostic(pred)
        err = capsys.readouterr().err
        assert err.count("nearly identical") == 1 and "--reference TRAIN.h5ad" in err and "reference=" not in err
    finally:
        end_cli_logging()
        logging.getLogger("perturbdiff").handlers[:] = [logging.NullHandler()]
    with pytest.warns(UserWarning, match="pass reference="):
        collapse_diagnostic(pred)
