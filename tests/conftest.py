"""Shared fixtures: a tiny simulated Perturb-seq data set, its keys and its preprocessed form (session-scoped).

The fixtures are shared between tests: never modify them in place (``.copy()`` first).
"""

from __future__ import annotations

import pytest
from anndata import AnnData

from perturbdiff.data import DataKeys, preprocess
from perturbdiff.datasets import simulate


@pytest.fixture(scope="session")
def synthetic_counts() -> AnnData:
    """600 cells x 120 genes of raw counts: 3 cell types, 2 batches, 6 perturbations + 2 combinations."""
    return simulate(600, 120, n_cell_types=3, n_batches=2, n_perturbations=6, n_combos=2, seed=0)


@pytest.fixture(scope="session")
def synthetic_keys() -> DataKeys:
    """The keys of ``synthetic_counts``."""
    return DataKeys(
        pert_key="perturbation",
        control_value="control",
        context_keys=("cell_type",),
        input_kind="counts",
        batch_key="batch",
    )


@pytest.fixture(scope="session")
def synthetic_prep(synthetic_counts: AnnData, synthetic_keys: DataKeys) -> AnnData:
    """``preprocess(synthetic_counts, synthetic_keys, n_hvg=100)``: log1p float32 CSR, 100 genes, with a record."""
    return preprocess(synthetic_counts, synthetic_keys, n_hvg=100)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tests' tensors are tiny: one thread is faster and immune to oversubscription on shared 2-core boxes.
    OMP_NUM_THREADS=1 keeps the command line's ``--threads auto`` at that count too (auto obeys it), so two CLI
    runs that must give the same bits do not time their way to different counts; tests/test_threads.py lifts it."""
    import os

    import torch

    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
