"""preprocess / get_record / apply_record: scanpy transform, HVGs on training cells, genes aligned by name."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff import ConfigError, DataError
from perturbdiff.data import apply_record, get_record, preprocess


def _log1p_counts(X, target_sum: float = 1e4) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return np.log1p(X / X.sum(1, keepdims=True) * target_sum)  # (N, G)


def _as_log1p(adata: AnnData) -> AnnData:
    return AnnData(X=sp.csr_matrix(_log1p_counts(adata.X).astype(np.float32)), obs=adata.obs.copy(), var=adata.var)


def test_output_layout(synthetic_prep, synthetic_counts, synthetic_keys):
    p = synthetic_prep
    assert p.shape == (synthetic_counts.n_obs, 100)
    assert sp.isspmatrix_csr(p.X) or p.X.format == "csr"
    assert p.X.dtype == np.float32
    for col in synthetic_keys.columns:
        assert isinstance(p.obs[col].dtype, pd.CategoricalDtype)
        assert all(isinstance(c, str) for c in p.obs[col].cat.categories)
    pos = synthetic_counts.var_names.get_indexer(p.var_names)
    assert (pos >= 0).all() and (np.diff(pos) > 0).all()  # HVGs keep the data's gene order
    expected = _log1p_counts(synthetic_counts.X)[:, pos]
    np.testing.assert_allclose(p.X.toarray(), expected, rtol=1e-5, atol=1e-5)


def test_record(synthetic_prep, synthetic_keys):
    rec = get_record(synthetic_prep)
    assert rec["format"] == 1 and rec["input_kind"] == "counts" and rec["log1p"] is True
    assert rec["normalize"] == {"target_sum": 1e4} and rec["scale"] == 10.0
    assert rec["genes"] == list(synthetic_prep.var_names)
    assert rec["gene_selection"]["method"] == "hvg" and rec["gene_selection"]["flavor"] == "seurat"
    assert rec["gene_selection"]["n_train_cells"] == synthetic_prep.n_obs
    assert rec["keys"] == synthetic_keys.to_dict()
    assert {"anndata", "scanpy", "numpy", "perturbdiff"} <= set(rec["versions"])


def test_record_survives_h5ad(synthetic_prep, tmp_path):
    synthetic_prep.write_h5ad(tmp_path / "p.h5ad")
    assert get_record(ad.read_h5ad(tmp_path / "p.h5ad")) == get_record(synthetic_prep)


def test_get_record_absent(synthetic_counts):
    with pytest.raises(DataError, match="record"):
        get_record(synthetic_counts)


def test_input_not_modified(synthetic_counts, synthetic_keys):
    before = synthetic_counts.X.copy()
    obs_before = synthetic_counts.obs.copy()
    preprocess(synthetic_counts, synthetic_keys, n_hvg=50)
    assert (synthetic_counts.X != before).nnz == 0 and synthetic_counts.obs.equals(obs_before)
    assert "perturbdiff" not in synthetic_counts.uns


def test_hvg_on_train_cells_only(synthetic_counts, synthetic_keys):
    mask = (synthetic_counts.obs["batch"] == "batch1").to_numpy()
    p = preprocess(synthetic_counts, synthetic_keys, n_hvg=40, train_mask=mask)
    # HVGs depend only on the masked cells: the same as preprocessing those cells alone
    alone = preprocess(synthetic_counts[mask].copy(), synthetic_keys, n_hvg=40)
    assert list(p.var_names) == list(alone.var_names) and p.n_obs == synthetic_counts.n_obs
    assert get_record(p)["gene_selection"]["n_train_cells"] == int(mask.sum())
    everything = preprocess(synthetic_counts, synthetic_keys, n_hvg=40)
    assert list(everything.var_names) != list(p.var_names)


def test_bad_train_mask(synthetic_counts, synthetic_keys):
    with pytest.raises(DataError, match="train_mask"):
        preprocess(synthetic_counts, synthetic_keys, train_mask=np.ones(3, dtype=bool))
    with pytest.raises(DataError, match="no cells"):
        preprocess(synthetic_counts, synthetic_keys, train_mask=np.zeros(synthetic_counts.n_obs, dtype=bool))


def test_given_var_names_exact_order(synthetic_counts, synthetic_keys):
    genes = list(synthetic_counts.var_names[::-3])
    p = preprocess(synthetic_counts, synthetic_keys, var_names=genes)
    assert list(p.var_names) == genes
    rec = get_record(p)
    assert rec["gene_selection"]["method"] == "given" and rec["genes"] == genes
    cols = synthetic_counts.var_names.get_indexer(genes)
    np.testing.assert_allclose(p.X.toarray(), _log1p_counts(synthetic_counts.X)[:, cols], rtol=1e-5, atol=1e-5)


def test_given_var_names_missing_gene(synthetic_counts, synthetic_keys):
    with pytest.raises(DataError, match="NOTAGENE"):
        preprocess(synthetic_counts, synthetic_keys, var_names=["G0001", "NOTAGENE"])


def test_n_hvg_above_gene_count_keeps_all(synthetic_counts, synthetic_keys):
    p = preprocess(synthetic_counts, synthetic_keys, n_hvg=10_000)
    assert list(p.var_names) == list(synthetic_counts.var_names)
    assert get_record(p)["gene_selection"]["method"] == "all"


def test_counts_and_log1p_give_same_result(synthetic_counts, synthetic_keys):
    from_counts = preprocess(synthetic_counts, synthetic_keys, n_hvg=60)
    log_keys = dataclasses.replace(synthetic_keys, input_kind="log1p")
    from_log = preprocess(_as_log1p(synthetic_counts), log_keys, n_hvg=60)
    assert list(from_counts.var_names) == list(from_log.var_names)
    np.testing.assert_allclose(from_counts.X.toarray(), from_log.X.toarray(), rtol=1e-5, atol=1e-5)
    rec = get_record(from_log)
    assert rec["normalize"] is None and rec["log1p"] is False and rec["input_kind"] == "log1p"


def test_dense_input_same_as_sparse(synthetic_counts, synthetic_keys, synthetic_prep):
    dense = AnnData(X=synthetic_counts.X.toarray(), obs=synthetic_counts.obs.copy(), var=synthetic_counts.var)
    p = preprocess(dense, synthetic_keys, n_hvg=100)
    assert list(p.var_names) == list(synthetic_prep.var_names)
    np.testing.assert_allclose(p.X.toarray(), synthetic_prep.X.toarray(), rtol=1e-6)


def _shuffled_genes(adata: AnnData, seed: int = 0) -> AnnData:
    order = np.random.default_rng(seed).permutation(adata.n_vars)
    return adata[:, order].copy()


def test_apply_record_aligns_by_name(synthetic_counts, synthetic_prep):
    rec = get_record(synthetic_prep)
    out = apply_record(_shuffled_genes(synthetic_counts), rec, input_kind="counts")
    assert list(out.var_names) == rec["genes"]
    np.testing.assert_allclose(out.X.toarray(), synthetic_prep.X.toarray(), rtol=1e-5, atol=1e-6)
    assert get_record(out)["genes"] == rec["genes"]


def test_apply_record_log1p_input(synthetic_counts, synthetic_prep):
    out = apply_record(_as_log1p(synthetic_counts), get_record(synthetic_prep), input_kind="log1p")
    np.testing.assert_allclose(out.X.toarray(), synthetic_prep.X.toarray(), rtol=1e-5, atol=1e-5)


def _partial(adata: AnnData, drop: list[str]) -> AnnData:
    """Shuffled genes, ``drop`` removed, two extra genes added."""
    a = _shuffled_genes(adata)
    a = a[:, ~a.var_names.isin(drop)].copy()
    ones = sp.csr_matrix(np.ones((a.n_obs, 2), dtype=np.float32))
    extra = AnnData(X=ones, obs=pd.DataFrame(index=a.obs_names), var=pd.DataFrame(index=["X1", "X2"]))
    out = ad.concat([a, extra], axis=1, merge="first")
    out.obs = a.obs.copy()
    assert out.n_obs == a.n_obs
    return out


def test_apply_record_missing_genes_error(synthetic_counts, synthetic_prep):
    rec = get_record(synthetic_prep)
    drop = rec["genes"][:3]
    new = _partial(_as_log1p(synthetic_counts), drop)
    with pytest.raises(DataError, match=rf"3 of 100 .*{drop[0]}.*missing_genes='zero'"):
        apply_record(new, rec, input_kind="log1p")


def test_apply_record_missing_message_is_bounded(synthetic_counts, synthetic_prep):
    rec = get_record(synthetic_prep)
    new = _partial(_as_log1p(synthetic_counts), rec["genes"][:25])
    with pytest.raises(DataError, match=r"25 of 100") as e:
        apply_record(new, rec, input_kind="log1p")
    assert rec["genes"][9] in str(e.value) and rec["genes"][10] not in str(e.value)


def test_apply_record_missing_genes_zero(synthetic_counts, synthetic_prep):
    rec = get_record(synthetic_prep)
    drop = rec["genes"][5:8]
    out = apply_record(_partial(_as_log1p(synthetic_counts), drop), rec, input_kind="log1p", missing_genes="zero")
    assert list(out.var_names) == rec["genes"]  # extra genes X1, X2 dropped, order of the record
    got, ref = out.X.toarray(), synthetic_prep.X.toarray()
    assert not got[:, 5:8].any()
    keep = np.r_[0:5, 8:100]
    np.testing.assert_allclose(got[:, keep], ref[:, keep], rtol=1e-5, atol=1e-5)
    assert json.loads(out.uns["perturbdiff"]["record"])["applied"]["n_missing_genes"] == 3


def test_apply_record_validates_values(synthetic_counts, synthetic_prep):
    with pytest.raises(DataError, match="'counts'.*non-integer"):
        apply_record(_as_log1p(synthetic_counts), get_record(synthetic_prep), input_kind="counts")


def test_apply_record_counts_on_log1p_record_warns(synthetic_counts, synthetic_keys):
    log_keys = dataclasses.replace(synthetic_keys, input_kind="log1p")
    rec = get_record(preprocess(_as_log1p(synthetic_counts), log_keys, n_hvg=30))
    with pytest.warns(UserWarning, match="target_sum is unknown"):
        out = apply_record(synthetic_counts, rec, input_kind="counts")
    assert list(out.var_names) == rec["genes"]


def test_apply_record_bad_option(synthetic_counts, synthetic_prep):
    with pytest.raises(ConfigError, match="'drop'"):
        apply_record(synthetic_counts, get_record(synthetic_prep), input_kind="counts", missing_genes="drop")
