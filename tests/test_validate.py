"""register(): one clear DataError naming the column / value / gene, warnings for thin groups."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import DataError
from perturbdiff.data import DataKeys, register
from perturbdiff.datasets import load_kang2018, read_h5ad


def _quiet_register(adata, keys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return register(adata, keys)


def _with_X(adata, X) -> AnnData:
    return AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy())


def _log1p(adata) -> np.ndarray:
    X = adata.X.toarray()
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)


def test_valid_data_passes_sparse_and_dense(synthetic_counts, synthetic_keys):
    assert _quiet_register(synthetic_counts, synthetic_keys) == synthetic_keys
    assert _quiet_register(_with_X(synthetic_counts, synthetic_counts.X.toarray()), synthetic_keys)
    log_keys = dataclasses.replace(synthetic_keys, input_kind="log1p")
    assert _quiet_register(_with_X(synthetic_counts, _log1p(synthetic_counts)), log_keys)


def test_keys_dict_roundtrip():
    keys = DataKeys("p", "ctrl", "ct", "counts", batch_key="b")
    assert keys.context_keys == ("ct",)
    assert DataKeys.from_dict(keys.to_dict()) == keys
    assert keys.columns == ("p", "ct", "b")


@pytest.mark.parametrize("field", ["pert_key", "context_keys", "batch_key", "dose_key"])
def test_missing_column(synthetic_counts, synthetic_keys, field):
    value = ("nope_col",) if field == "context_keys" else "nope_col"
    keys = dataclasses.replace(synthetic_keys, **{field: value})
    with pytest.raises(DataError, match="'nope_col'") as e:
        register(synthetic_counts, keys)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_missing_values_in_key_column(synthetic_counts, synthetic_keys):
    a = synthetic_counts.copy()
    ct = a.obs["cell_type"].astype(object)
    ct.iloc[:3] = np.nan
    a.obs["cell_type"] = ct
    with pytest.raises(DataError, match="'cell_type'.*3 missing"):
        register(a, synthetic_keys)


def test_control_value_absent(synthetic_counts, synthetic_keys):
    keys = dataclasses.replace(synthetic_keys, control_value="non-targeting")
    with pytest.raises(DataError, match="'non-targeting'.*'perturbation'"):
        register(synthetic_counts, keys)


def test_control_value_matches_non_string_column(synthetic_counts, synthetic_keys):
    a = synthetic_counts.copy()
    a.obs["dose"] = np.where(a.obs["perturbation"] == "control", 0, 1)  # integers: compared as strings
    keys = dataclasses.replace(synthetic_keys, pert_key="dose", control_value="0")
    assert _quiet_register(a, keys) == keys


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(("bad", "pattern"), [(np.nan, "1 NaN"), (np.inf, "1 infinite"), (-1.0, "negative")])
def test_bad_values(synthetic_counts, synthetic_keys, dense, bad, pattern):
    X = synthetic_counts.X.toarray()
    X[5, 7] = bad
    X = X if dense else sp.csr_matrix(X)
    with pytest.raises(DataError, match=pattern):
        register(_with_X(synthetic_counts, X), synthetic_keys)


@pytest.mark.parametrize("dense", [False, True])
def test_non_integers_declared_counts(synthetic_counts, synthetic_keys, dense):
    X = _log1p(synthetic_counts)
    with pytest.raises(DataError, match="'counts'.*non-integer"):
        register(_with_X(synthetic_counts, X if dense else sp.csr_matrix(X)), synthetic_keys)


def test_counts_declared_log1p(synthetic_counts, synthetic_keys):
    keys = dataclasses.replace(synthetic_keys, input_kind="log1p")
    top = int(synthetic_counts.X.max())
    with pytest.raises(DataError, match=f"'log1p'.*raw counts.*{top}"):
        register(synthetic_counts, keys)


def test_unlogged_values_declared_log1p(synthetic_counts, synthetic_keys):
    X = synthetic_counts.X.toarray()
    X = X / X.sum(1, keepdims=True) * 1e4  # normalised but not logged: non-integer and large
    keys = dataclasses.replace(synthetic_keys, input_kind="log1p")
    with pytest.raises(DataError, match="'log1p'.*too large"):
        register(_with_X(synthetic_counts, sp.csr_matrix(X)), keys)


def test_duplicate_gene_names(synthetic_counts, synthetic_keys):
    a = synthetic_counts.copy()
    names = list(a.var_names)
    names[10] = names[3]
    a.var_names = pd.Index(names)
    with pytest.raises(DataError, match=f"duplicate gene names.*'{names[3]}'"):
        register(a, synthetic_keys)


def test_bad_input_kind(synthetic_counts, synthetic_keys):
    with pytest.raises(DataError, match="'raw'"):
        register(synthetic_counts, dataclasses.replace(synthetic_keys, input_kind="raw"))


def test_warns_context_without_controls(synthetic_counts, synthetic_keys):
    a = synthetic_counts[
        ~((synthetic_counts.obs["perturbation"] == "control") & (synthetic_counts.obs["cell_type"] == "CT2"))
    ]
    with pytest.warns(UserWarning, match=r"no 'control' cells: \(CT2, batch1\).*fall back"):
        register(a.copy(), synthetic_keys)
    no_batch = dataclasses.replace(synthetic_keys, batch_key=None)
    with pytest.warns(UserWarning, match=r"\(CT2\).*other contexts"):
        register(a.copy(), no_batch)


def test_warns_condition_with_one_cell(synthetic_counts, synthetic_keys):
    a = synthetic_counts.copy()
    pert = a.obs["perturbation"].astype(str).to_numpy().copy()
    pert[0] = "LONELY"
    a.obs["perturbation"] = pd.Categorical(pert)
    ct = a.obs["cell_type"].iloc[0]
    with pytest.warns(UserWarning, match=rf"fewer than 2 cells: \({ct}, LONELY\)"):
        register(a, synthetic_keys)


def test_fast_on_many_cells():
    """120k cells x 2k genes sparse: the full value scan and the group checks stay well under a few seconds."""
    n, g = 120_000, 2_000
    rng = np.random.default_rng(0)
    per_row = 100  # 5 % density, built directly (sp.random is slow at this size)
    indices = np.tile(np.arange(0, g, g // per_row, dtype=np.int32), n)
    data = rng.integers(1, 40, n * per_row).astype(np.float32)
    X = sp.csr_matrix((data, indices, np.arange(0, n * per_row + 1, per_row)), shape=(n, g))
    obs = pd.DataFrame(
        {
            "p": pd.Categorical(rng.choice(["control", "A", "B", "C"], n)),
            "ct": pd.Categorical(rng.choice(["x", "y", "z"], n)),
        },
        index=pd.RangeIndex(n).astype(str),
    )
    a = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    t = time.perf_counter()
    _quiet_register(a, DataKeys("p", "control", ("ct",), "counts"))
    assert time.perf_counter() - t < 3.0


def test_read_h5ad_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_h5ad(tmp_path / "none.h5ad")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match="text.h5ad is not an .h5ad"):
        read_h5ad(tmp_path / "text.h5ad")


def _kang_like(synthetic_counts, tmp_path, **obs) -> str:
    n = synthetic_counts.n_obs
    a = AnnData(X=synthetic_counts.X, obs=pd.DataFrame(obs, index=synthetic_counts.obs_names[:n]))
    path = tmp_path / "kang.h5ad"
    a.write_h5ad(path)
    return str(path)


def test_load_kang2018_pertpy_layout(synthetic_counts, tmp_path):
    n = synthetic_counts.n_obs
    label = np.where(np.arange(n) % 2 == 0, "ctrl", "stim")
    path = _kang_like(synthetic_counts, tmp_path, label=label, cell_type=np.full(n, "B"))
    a = load_kang2018(path)
    assert list(a.obs["condition"][:2]) == ["control", "stimulated"]
    _quiet_register(a, DataKeys("condition", "control", ("cell_type",), "counts"))


def test_load_kang2018_errors(synthetic_counts, tmp_path):
    n = synthetic_counts.n_obs
    with pytest.raises(DataError, match="'stim' or 'label'"):
        load_kang2018(_kang_like(synthetic_counts, tmp_path, cell_type=np.full(n, "B")))
    with pytest.raises(DataError, match="'seurat_annotations' or 'cell_type'"):
        load_kang2018(_kang_like(synthetic_counts, tmp_path, stim=np.full(n, "CTRL")))
    with pytest.raises(DataError, match="'stim'.*'IFN'"):
        load_kang2018(_kang_like(synthetic_counts, tmp_path, stim=np.full(n, "IFN"), cell_type=np.full(n, "B")))
