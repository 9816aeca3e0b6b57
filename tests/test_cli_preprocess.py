"""``perturbdiff preprocess`` and ``perturbdiff simulate`` end to end on tiny synthetic files."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from perturbdiff.cli import main
from perturbdiff.data import get_record


@pytest.fixture(scope="module")
def counts_file(synthetic_counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "counts.h5ad"
    synthetic_counts.write_h5ad(path)
    return path


def _args(path, out, *extra: str) -> list[str]:
    return [
        "preprocess",
        str(path),
        "--pert-key",
        "perturbation",
        "--control-value",
        "control",
        "--context-keys",
        "cell_type",
        "--batch-key",
        "batch",
        "--input-kind",
        "counts",
        "--out",
        str(out),
        *extra,
    ]


def test_preprocess_writes_and_summarises(counts_file, tmp_path, capsys):
    out = tmp_path / "prep.h5ad"
    assert main(_args(counts_file, out, "--n-hvg", "50")) == 0
    summary = capsys.readouterr().out
    assert "600 cells x 50 genes" in summary and "24 perturbed conditions" in summary and "3 contexts" in summary
    p = ad.read_h5ad(out)
    rec = get_record(p)
    assert p.n_vars == 50 and rec["gene_selection"]["n_train_cells"] == 600
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def _split_json(tmp_path, synthetic_counts, var_names=None):
    obs = synthetic_counts.obs
    perts = sorted(p for p in obs["perturbation"].cat.categories if p != "control")
    train = [[ct, p] for ct in ("CT1", "CT2") for p in perts] + [["CT3", perts[0]]]
    test = [["CT3", p] for p in perts[1:]]
    d = {
        "name": "t",
        "pert_col": "perturbation",
        "context_cols": ["cell_type"],
        "control": "control",
        "train": train,
        "val": [],
        "test": test,
    }
    if var_names is not None:
        d["var_names"] = var_names
    path = tmp_path / "split.json"
    path.write_text(json.dumps(d))
    n_train = int((obs["cell_type"].isin(["CT1", "CT2"]) | (obs["perturbation"] == "control")).sum())
    n_train += int(((obs["cell_type"] == "CT3") & (obs["perturbation"] == perts[0])).sum())
    return path, n_train


def test_preprocess_hvgs_on_split_training_cells(counts_file, synthetic_counts, tmp_path, capsys):
    split, n_train = _split_json(tmp_path, synthetic_counts)
    out = tmp_path / "prep.h5ad"
    assert main(_args(counts_file, out, "--n-hvg", "40", "--split", str(split))) == 0
    assert f"HVGs of {n_train} cells" in capsys.readouterr().out
    rec = get_record(ad.read_h5ad(out))
    assert rec["gene_selection"]["n_train_cells"] == n_train < synthetic_counts.n_obs


def test_preprocess_split_var_names(counts_file, synthetic_counts, tmp_path):
    genes = list(synthetic_counts.var_names[[7, 3, 50, 11]])
    split, _ = _split_json(tmp_path, synthetic_counts, var_names=genes)
    out = tmp_path / "prep.h5ad"
    assert main(_args(counts_file, out, "--split", str(split))) == 0
    assert list(ad.read_h5ad(out).var_names) == genes


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("--pert-key", "treatment"), "'treatment'"),
        (("--control-value", "DMSO"), "'DMSO'"),
        (("--context-keys", "cell_type,donor"), "'donor'"),
    ],
)
def test_preprocess_error_is_one_line_exit_2(counts_file, tmp_path, capsys, change, needle):
    args = _args(counts_file, tmp_path / "x.h5ad")
    args[args.index(change[0]) + 1] = change[1]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("perturbdiff preprocess: error:")
    assert not (tmp_path / "x.h5ad").exists()


def test_preprocess_missing_input_file(tmp_path, capsys):
    assert main(_args(tmp_path / "absent.h5ad", tmp_path / "x.h5ad")) == 2
    err = capsys.readouterr().err.strip()
    assert "absent.h5ad" in err and len(err.splitlines()) == 1


def test_preprocess_not_an_h5ad(tmp_path, capsys):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("cell,gene\n")
    assert main(_args(bad, tmp_path / "x.h5ad")) == 2
    assert "not an .h5ad" in capsys.readouterr().err


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    assert main(["simulate", "--out", str(out), "--n-cells", "300", "--n-genes", "40", "--seed", "2"]) == 0
    a = ad.read_h5ad(out)
    assert a.shape == (300, 40) and "simulation" in a.uns
    assert "300 cells x 40 genes" in capsys.readouterr().out
