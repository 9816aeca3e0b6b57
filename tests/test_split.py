"""Splits: strategy invariants, determinism, JSON format (incl. the shared benchmark files), validation, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff import DataError
from perturbdiff.data import STRATEGIES, DataKeys, Split, condition_labels, make_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
PERTS = ["A", "B", "C", "D", "E", "F", "A+B", "C+D", "E+F", "A+G"]  # G is never measured alone
CTX = ["T", "B", "NK", "Mono"]


def tiny_obs_adata(n_per: int = 3, donors: bool = False) -> ad.AnnData:
    """Every (cell type[, donor]) x (control + PERTS) with n_per cells; X empty log1p-like CSR."""
    rows = [
        (ct, d, p)
        for ct in CTX
        for d in (["d1", "d2"] if donors else ["d1"])
        for p in ["control", *PERTS]
        for _ in range(n_per)
    ]
    obs = pd.DataFrame(rows, columns=["cell_type", "donor", "perturbation"]).astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(sp.csr_matrix((len(obs), 5), dtype=np.float32), obs=obs)


KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p")
KEYS2 = DataKeys("perturbation", "control", ("cell_type", "donor"), "log1p")


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return tiny_obs_adata()


def test_condition_labels_per_cell(adata):
    labels = condition_labels(adata, KEYS)
    assert list(labels.index) == list(adata.obs_names)
    expected = [((c,), p) for c, p in zip(adata.obs["cell_type"], adata.obs["perturbation"])]
    assert labels.tolist() == expected
    assert labels.iloc[0] == (("T",), "control")  # control cells get (context, control)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_invariants(adata, strategy):
    s = make_split(adata, KEYS, strategy, seed=3)
    train, val, test = set(s.train), set(s.val), set(s.test)
    assert test and not (train & test) and not (train & val) and not (val & test)
    perturbed = {((c,), p) for c in CTX for p in PERTS}
    assert train | val | test == perturbed  # controls are never listed
    assert s.test_n_cells == [3] * len(s.test)
    assert s.var_names is None and s.strategy == strategy  # genes are chosen later, on the training cells
    assert make_split(adata, KEYS, strategy, seed=3).to_dict() == s.to_dict()  # reproducible from the seed
    others = [make_split(adata, KEYS, strategy, seed=k).to_dict() for k in range(4, 10)]
    assert any(o != s.to_dict() for o in others)


def test_contexts_partial(adata):
    s = make_split(adata, KEYS, "held-out-contexts-partial", holdout=["NK"], seed=0)
    held = [c for c in s.train if c[0] == ("NK",)]
    assert len(held) == 3 and len(s.val) == 1 and len(s.test) == 6  # 10 perturbations: 30 % train, 1 val
    assert {c[0] for c in s.val + s.test} == {("NK",)}
    assert all(((ct,), p) in s.train for ct in ["T", "B", "Mono"] for p in PERTS)


def test_contexts(adata):
    s = make_split(adata, KEYS, "held-out-contexts", holdout=["Mono"], seed=0)
    assert set(s.test) == {(("Mono",), p) for p in PERTS}
    assert s.val and all(c[0] != ("Mono",) for c in s.val + s.train)
    s2 = make_split(adata, KEYS, "held-out-contexts", holdout=["Mono", "NK"], seed=0)
    assert {c[0] for c in s2.val} | {c[0] for c in s2.test} == {("Mono",), ("NK",)}
    assert len({c[0] for c in s2.val}) == 1 and {c[0] for c in s2.val}.isdisjoint({c[0] for c in s2.test})


def test_contexts_multi_column():
    a = tiny_obs_adata(n_per=1, donors=True)
    s = make_split(a, KEYS2, "held-out-contexts", holdout=["d2"], seed=0)
    assert {c[0] for c in s.test} == {(ct, "d2") for ct in CTX}
    assert all(c[0][1] == "d1" for c in s.train)


def test_perturbations_unseen_everywhere(adata):
    s = make_split(adata, KEYS, "held-out-perturbations", holdout=["C"], seed=0)
    assert {p for _, p in s.test} == {"C", "C+D"}  # combinations containing C are held out too
    train_parts = {q for _, p in s.train for q in p.split("+")}
    assert "C" not in train_parts and s.val and not {p for _, p in s.val} & {"C", "C+D"}


def test_combinations(adata):
    s = make_split(adata, KEYS, "held-out-combinations", seed=1)
    singles_train = {p for _, p in s.train if "+" not in p}
    assert singles_train == {"A", "B", "C", "D", "E", "F"}
    for _, p in s.test + s.val:
        assert "+" in p and all(q in singles_train for q in p.split("+"))
    assert all("A+G" != p for _, p in s.test + s.val)  # G never measured alone: not drawn by default


@pytest.mark.parametrize(
    "strategy,holdout,name",
    [
        ("held-out-contexts", ["Kidney"], "Kidney"),
        ("held-out-perturbations", ["ZZZ3"], "ZZZ3"),
        ("held-out-combinations", ["A"], "A"),
        ("no-such-strategy", None, "no-such-strategy"),
    ],
)
def test_bad_holdout_names_value(adata, strategy, holdout, name):
    with pytest.raises(DataError, match=name):
        make_split(adata, KEYS, strategy, holdout=holdout)


def test_json_roundtrip_multi_context(tmp_path):
    a = tiny_obs_adata(n_per=1, donors=True)
    s = make_split(a, KEYS2, "held-out-contexts-partial", holdout=["d2"], seed=5)
    s.write(tmp_path / "s.json")
    raw = json.loads((tmp_path / "s.json").read_text())
    assert raw["strategy"] == "held-out-contexts-partial" and isinstance(raw["test"][0][0], list)
    back = Split.read(tmp_path / "s.json")
    assert back.to_dict() == s.to_dict() and back.test == s.test


def test_json_single_context_as_string(adata, tmp_path):
    s = make_split(adata, KEYS, "held-out-contexts", holdout=["T"])
    s.write(tmp_path / "s.json")
    raw = json.loads((tmp_path / "s.json").read_text())
    assert raw["test"][0] == ["T", raw["test"][0][1]] and isinstance(raw["test"][0][0], str)


def test_check_against_data(adata):
    s = make_split(adata, KEYS, "held-out-contexts", holdout=["T"])
    s.check(adata, KEYS)
    s.test.append((("Kidney",), "A"))
    s.check(adata, KEYS)  # a test condition never measured is valid: users predict what they have not measured
    with pytest.raises(DataError, match="test condition.*Kidney/A"):
        s.check(adata, KEYS, need_test=True)  # only scoring needs its cells
    s.val.append((("Kidney",), "B"))
    with pytest.raises(DataError, match="val condition.*Kidney/B"):
        s.check(adata, KEYS)
    with pytest.raises(DataError, match="condition"):
        make_split(adata, KEYS, "held-out-contexts").check(
            adata, DataKeys("condition", "control", ("cell_type",), "log1p")
        )
    with pytest.raises(DataError, match="cell_line"):
        s.check(adata, DataKeys("perturbation", "control", ("cell_line",), "log1p"))


@pytest.mark.parametrize("name", ["devel_gbm", "devel_combo", "kang_celltype"])
def test_read_shared_benchmark_files(name, tmp_path):
    path = SHARED / f"{name}.json"
    if not path.exists():
        pytest.skip("shared benchmarks not present")
    raw = json.loads(path.read_text())
    s = Split.read(path)
    assert len(s.train) == len(raw["train"]) and len(s.test) == len(raw["test"]) == len(s.test_n_cells)
    assert all(isinstance(c, tuple) and len(c) == 1 and isinstance(p, str) for c, p in s.train + s.val + s.test)
    out = s.to_dict()
    assert out.pop("strategy") == "" and out == raw  # written back unchanged (plus "strategy")
    s.write(tmp_path / "copy.json")
    assert Split.read(tmp_path / "copy.json").to_dict() == s.to_dict()


def test_cli_split(adata, tmp_path, capsys):
    from perturbdiff.cli import split as cli_split

    a = adata.copy()
    a.uns["perturbdiff"] = {"record": json.dumps({"format": 1, "genes": list(a.var_names), "keys": KEYS.to_dict()})}
    a.write_h5ad(tmp_path / "d.h5ad")
    parser = argparse.ArgumentParser()
    cli_split.add_arguments(parser)
    argv = [str(tmp_path / "d.h5ad"), "--strategy", "held-out-contexts", "--holdout", "NK,T", "--out"]
    args = parser.parse_args([*argv, str(tmp_path / "s.json")])
    assert cli_split.run(args) == 0
    s = Split.read(tmp_path / "s.json")
    assert {c[0] for c in s.test + s.val} == {("NK",), ("T",)} and s.name == "d_held-out-contexts"
    assert "train" in capsys.readouterr().out
