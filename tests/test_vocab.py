"""Vocabularies: built from training conditions, reserved index 0, combinations, unknown labels, JSON round-trip."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff import DataError
from perturbdiff.data import DataKeys, Vocab

KEYS = DataKeys("perturbation", "control", ("cell_type",), "log1p", batch_key="batch", dose_key="dose")


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    rows = [
        (ct, p, b, "0" if p == "control" else d)
        for ct in ["T", "B"]
        for p in ["control", "A", "B", "A+B", "Z"]
        for b in ["b1", "b2"]
        for d in ["1.0", "10.0"]
    ]
    obs = pd.DataFrame(rows, columns=["cell_type", "perturbation", "batch", "dose"]).astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(sp.csr_matrix((len(obs), 3), dtype=np.float32), obs=obs)


TRAIN = [(("T",), "A"), (("T",), "B"), (("B",), "A+B")]


def test_build_from_training_conditions(adata):
    v = Vocab.build(adata, KEYS, TRAIN)
    assert v.pert == ["<pad>", "control", "<unknown>", "A", "B"]  # Z only in non-training conditions: not known
    assert v.perturbations == ["A", "B"]
    assert v.contexts == [["<unknown>", "B", "T"]]  # contexts from all cells
    assert v.batch == ["<unknown>", "b1", "b2"] and v.dose == ["<none>", "0", "1.0", "10.0"]
    assert v.sizes == {"pert": 5, "contexts": [3], "batch": 3, "dose": 4}


def test_no_batch_or_dose_key(adata):
    v = Vocab.build(adata, DataKeys("perturbation", "control", ("cell_type",), "log1p"), TRAIN)
    assert v.batch == ["<none>"] and v.dose == ["<none>"]
    cov = v.encode([(("T",), "A")])
    assert cov.batch.tolist() == [0] and cov.dose.tolist() == [0]


def test_encode_combinations_and_control(adata):
    v = Vocab.build(adata, KEYS, TRAIN)
    cov = v.encode([(("T",), "A+B"), (("B",), "control"), (("T",), "B")], ["b2", "b1", "b1"], ["10.0", None, "1.0"])
    assert cov.pert.dtype == np.int64 and cov.pert.tolist() == [[3, 4], [1, 0], [4, 0]]
    assert cov.context.tolist() == [[2], [1], [2]]
    assert cov.batch.tolist() == [2, 1, 1] and cov.dose.tolist() == [3, 0, 2]
    assert len(cov) == 3


def test_unknown_perturbation_always_errors(adata):
    v = Vocab.build(adata, KEYS, TRAIN)
    for unknown in ("error", "unknown"):
        with pytest.raises(DataError, match=r"A\+Z hold .*never seen in training.*: Z"):
            v.encode([(("T",), "A+Z")], unknown=unknown)


def test_unknown_context_and_batch(adata):
    v = Vocab.build(adata, KEYS, TRAIN)
    with pytest.raises(DataError, match="Kidney"):
        v.encode([(("Kidney",), "A")])
    with pytest.raises(DataError, match="b9"):
        v.encode([(("T",), "A")], batch_values=["b9"])
    cov = v.encode([(("Kidney",), "A")], batch_values=["b9"], unknown="unknown")
    assert cov.context.tolist() == [[0]] and cov.batch.tolist() == [0] and cov.pert.tolist() == [[3]]


def test_json_roundtrip(adata):
    v = Vocab.build(adata, KEYS, TRAIN)
    back = Vocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v
    conds = [(("B",), "A+B"), (("T",), "control")]
    a, b = v.encode(conds, ["b1", "b2"]), back.encode(conds, ["b1", "b2"])
    assert np.array_equal(a.pert, b.pert) and np.array_equal(a.batch, b.batch)


def test_unseen_perturbation_maps_to_the_generic_token_only_when_asked(adata, caplog):
    v = Vocab.build(adata, KEYS, TRAIN)
    with pytest.raises(DataError, match=r"A\+Z hold .*never seen in training.*: Z"):
        v.encode_pert(["A+Z"])
    from perturbdiff.data import _vocab

    _vocab._GENERIC_TOLD.discard("A+Z")  # told once per process
    with caplog.at_level("WARNING", logger="perturbdiff"):
        table = v.encode_pert(["A+Z"], unknown="generic")
    assert table.tolist() == [[v.pert.index("A"), v.pert.index("<unknown>")]]
    assert "'Z'" in caplog.text
