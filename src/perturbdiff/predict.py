"""Conditions → generated cells → AnnData in the evaluation layout (SPEC §3 sampling, §6 layout)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from perturbdiff.config import DiffusionConfig
from perturbdiff.data._matrix import as_csr, row_reader
from perturbdiff.data._sets import draw_positions
from perturbdiff.data._split import Condition, condition_codes
from perturbdiff.diffusion import Schedule, ddim_sample


def plan_sets(pools: Sequence[np.ndarray], n_cells: Sequence[int], S: int, n_samples: int, seed: int):
    """Control rows for every set to generate: rows [N, S], condition index [N], sample id [N]."""
    rows, cond, sample = [], [], []
    for k in range(n_samples):
        for i, (pool, n) in enumerate(zip(pools, n_cells)):
            n_sets = math.ceil(n / S)
            if n_sets == 0:
                continue
            rng = np.random.default_rng([seed, k, i])
            pos, _ = draw_positions(rng, len(pool), n_sets, S)
            rows.append(pool[pos])
            cond += [i] * n_sets
            sample += [k] * n_sets
    if not rows:
        return np.zeros((0, S), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.asarray(cond, np.int64), np.asarray(sample, np.int64)


@torch.no_grad()
def generate(network: torch.nn.Module, sched: Schedule, dcfg: DiffusionConfig, X, control_rows: np.ndarray,
             cov: dict[str, np.ndarray], *, scale: float, clip_max: float | None = None,
             zero_threshold: float | None = None, seed: int = 0,
             batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """DDIM-sample one target set per row of ``control_rows`` [N, S]; returns model-space cells [N, S, G]."""
    X, device = row_reader(X), torch.device(device)  # in-memory CSR or a store's lazy rows
    network = network.to(device).eval()
    N, S = control_rows.shape
    out = np.zeros((N, S, X.shape[1]), np.float32)
    chunks = range(0, N, batch_size)
    for c in tqdm(chunks, disable=not progress, desc="sample", unit="batch", dynamic_ncols=True):
        sl = slice(c, min(c + batch_size, N))
        ctrl = torch.from_numpy(X[control_rows[sl].ravel()].toarray() / scale).view(-1, S, X.shape[1])
        cv = {k: torch.from_numpy(np.ascontiguousarray(v[sl])).to(device) for k, v in cov.items()}
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + c)
        x0 = ddim_sample(network, sched, ctrl.to(device), cv, steps=dcfg.sampler_steps, guidance=dcfg.guidance,
                         start=dcfg.sampler_start, truncated_start_t=dcfg.truncated_start_t, generator=gen,
                         zero_threshold=dcfg.zero_threshold if zero_threshold is None else zero_threshold,
                         clip_max=clip_max)
        out[sl] = x0.float().cpu().numpy()
    return out


def majority(codes: np.ndarray) -> np.ndarray:
    """Most frequent non-negative code per row of [N, S] (-1 where a row has none)."""
    if codes.size == 0:
        return np.zeros(len(codes), np.int64)
    n = max(int(codes.max()) + 2, 2)
    counts = np.stack([(codes == v).sum(1) for v in range(-1, n - 1)], axis=1)  # (N, n)
    counts[:, 0] = 0
    best = counts.argmax(1) - 1
    return np.where(counts.max(1) > 0, best, -1)


def assemble(parts: Sequence[tuple[int, int, np.ndarray]], conditions: Sequence[Condition],
             genes: Sequence[str], keys, *, scale: float) -> AnnData:
    """(condition index, sample id, model-space cells [n, G]) triples → one log1p AnnData of predicted cells."""
    X = sp.csr_matrix(np.concatenate([c for _, _, c in parts]) * np.float32(scale))
    cc = np.concatenate([np.full(len(c), i) for i, _, c in parts]).astype(np.int64)
    obs = pd.DataFrame({keys.pert_key: [conditions[i][1] for i in cc]})
    for j, col in enumerate(keys.context_keys):
        obs[col] = [conditions[i][0][j] for i in cc]
    obs["sample"] = np.concatenate([np.full(len(c), k) for _, k, c in parts]).astype(np.int64)
    obs["predicted"] = True
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))


def with_controls(pred: AnnData, adata: AnnData, keys, contexts: set[tuple[str, ...]]) -> AnnData:
    """Append the real control cells of ``contexts`` (flagged predicted=False, sample=-1) to ``pred``."""
    import anndata as ad

    code, present = condition_codes(adata, keys)
    want = [i for i, (ctx, p) in enumerate(present) if p == keys.control_value and ctx in contexts]
    rows = np.flatnonzero(np.isin(code, want))
    cols = [keys.pert_key, *keys.context_keys]
    ctrl = AnnData(X=as_csr(adata.X[rows]), obs=adata.obs.iloc[rows][cols].astype(str).copy(),
                   var=pd.DataFrame(index=adata.var_names.copy()))
    ctrl.obs["sample"] = -1
    ctrl.obs["predicted"] = False
    ctrl.obs.index = [f"ctrl_{i}" for i in range(ctrl.n_obs)]
    out = ad.concat([pred, ctrl], join="outer", merge="first")
    for col in cols:
        out.obs[col] = out.obs[col].astype(str).astype("category")
    out.obs["predicted"] = out.obs["predicted"].astype(bool)
    return out


def output_uns(record: dict, **settings) -> dict:
    """What ``uns['perturbdiff']`` of a prediction holds: the scale of X and how it was made."""
    return {"scale": "log1p", "record": json.dumps(record), "settings": json.dumps(settings)}
