"""The optional cell-eval2 scorer: its replicate scale orders real above control cells, equals cell-eval2's own
``score_metrics`` where every member has a scale, and its errors (package missing, --preset without it)."""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

pytest.importorskip("cell_eval2")

from perturbdiff import ConfigError  # noqa: E402
from perturbdiff.cli import main  # noqa: E402
from perturbdiff.evaluate import _cell_eval2 as ce2  # noqa: E402

PERT, CTX, CTRL = "perturbation", "cell_type", "control"


def toy(seed: int = 0, n: int = 40, g: int = 40) -> AnnData:
    """log1p: context c1 = control, A, B, C with clashing responses (so their mean is not any one's), c2 = control +
    A. A: genes 0-11 x4; B: 0-11 / 4, 12-23 x3; C: 12-23 / 3, 24-35 x4."""
    rng = np.random.default_rng(seed)
    fold = {CTRL: (1, 1, 1), "A": (4, 1, 1), "B": (1 / 4, 3, 1), "C": (1, 1 / 3, 4)}
    rows, blocks = [], []
    for ctx, perts in (("c1", (CTRL, "A", "B", "C")), ("c2", (CTRL, "A"))):
        for pert in perts:
            lam = np.full(g, 3.0)
            for k, f in enumerate(fold[pert]):
                lam[12 * k : 12 * (k + 1)] *= f
            blocks.append(np.log1p(rng.poisson(lam, (n, g)).astype(np.float32)))
            rows += [(ctx, pert)] * n
    obs = pd.DataFrame(rows, columns=[CTX, PERT], index=[f"cell{i}" for i in range(len(rows))])
    return AnnData(X=sp.csr_matrix(np.vstack(blocks)), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))


def as_control(real: AnnData, seed: int = 1) -> AnnData:
    """A prediction that is each context's control cells, relabelled as its perturbations (no response)."""
    rng = np.random.default_rng(seed)
    pert = (real.obs[PERT] != CTRL).to_numpy()
    rows = []
    for ctx in real.obs[CTX].unique():
        ctrl = np.flatnonzero(((real.obs[CTX] == ctx) & (real.obs[PERT] == CTRL)).to_numpy())
        rows.append(rng.choice(ctrl, ((real.obs[CTX] == ctx).to_numpy() & pert).sum()))
    out = AnnData(X=real.X[np.concatenate(rows)], obs=real.obs[pert].copy(), var=real.var)
    out.obs_names = real.obs_names[pert]
    return out


@pytest.fixture(scope="module")
def scored():
    real = toy()
    refs: dict = {}
    kw = dict(pert_col=PERT, control=CTRL, context_col=CTX, num_threads=1, refs=refs)
    same = ce2.score_cell_eval2(real[(real.obs[PERT] != CTRL).to_numpy()].copy(), real, **kw)
    ctrl = ce2.score_cell_eval2(as_control(real), real, **kw)
    return real, same, ctrl, refs


def _context(table: pd.DataFrame, ctx: str) -> pd.Series:
    rows = table[(table["level"] == "context") & (table["context"] == ctx)]
    return rows.set_index("metric")["scaled"]


def test_real_cells_score_near_the_replicate_and_control_cells_near_the_baseline(scored):
    _, same, ctrl, _ = scored
    s_same, s_ctrl = _context(same, "c1"), _context(ctrl, "c1")
    members = [m for m in s_same.index if m != "mean_scaled"]
    assert len(members) == 6 and s_same.notna().all() and s_ctrl.notna().all()
    assert s_same["mean_scaled"] > 0.8 and s_ctrl["mean_scaled"] < 0.2
    assert (s_same[members] > s_ctrl[members]).all()
    overall = same[same["level"] == "all"].set_index("metric")["scaled"]
    assert overall["mean_scaled"] == pytest.approx(s_same["mean_scaled"])  # c2 has no scale: c1 alone


def test_a_context_with_one_perturbation_has_no_scale(scored):
    _, same, _, _ = scored
    rows = same[(same["level"] == "context") & (same["context"] == "c2") & (same["metric"] != "mean_scaled")]
    assert rows["scaled"].isna().all() and rows["value"].notna().any()
    assert rows["note"].str.contains("one perturbation").all()


def test_scaled_scores_equal_cell_eval2s_own_from_replicate(scored, tmp_path):
    from cell_eval2 import aggregate_metrics_wide, compute_metrics, score_metrics
    from cell_eval2.anchor import _derive_seeds, build_meta, compute_replicate_anchor, write_anchor
    from cell_eval2.baseline import build_run_meta
    from cell_eval2.catalog import resolve_metrics
    from cell_eval2.run import metric_output_names
    from cell_eval2.score import expect_from_run_meta

    real, _, ctrl_table, refs = scored
    pred = as_control(real)
    ctx, p_ct, r_ct = ce2.context_pairs(pred, real, pert_col=PERT, control=CTRL, context_col=CTX)[0]
    assert ctx == "c1"
    cfg = ce2.eval2_config("vcc2026", pert_col=PERT, control=CTRL, labels=r_ct.obs[PERT].unique(),
                           genes=r_ct.var_names, num_threads=1)  # fmt: skip
    names = metric_output_names(cfg)
    user = aggregate_metrics_wide(compute_metrics(p_ct, r_ct, config=cfg), metrics=names)
    splits, anchor = compute_replicate_anchor(r_ct, config=cfg)
    meta = build_meta(real_ad=r_ct, cfg=cfg, names=resolve_metrics(cfg.metrics, version=cfg.version)[0],
                      base_seed=0, n_splits=5, seeds=_derive_seeds(0, 5), metrics=names)  # fmt: skip
    write_anchor(tmp_path, splits, anchor, meta=meta)
    official = score_metrics(user, refs[("vcc2026", "c1")]["base"].agg, anchor=tmp_path,
                             anchor_expect=expect_from_run_meta(build_run_meta(cfg, r_ct, p_ct)))  # fmt: skip
    want = dict(zip(official["metric"].to_list(), official["from_replicate"].to_list()))
    got = _context(ctrl_table, "c1")
    for m in ce2.scored_members(cfg):
        assert got[m] == pytest.approx(want[m], abs=1e-9), m
    assert got["mean_scaled"] == pytest.approx(want["avg_score"], abs=1e-9)


def test_scale_member_refuses_a_baseline_past_the_replicate():
    s, note = ce2.scale_member("pds_cosine", 0.9, 0.8, 0.7)
    assert math.isnan(s) and "no headroom" in note
    assert ce2.scale_member("pds_cosine", 0.75, 0.5, 1.0)[0] == pytest.approx(0.5)


def test_missing_package_names_the_extra(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ce2, "version", absent)
    with pytest.raises(ConfigError, match=r'pip install "perturbdiff\[eval2\]"'):
        ce2.check_cell_eval2("vcc2026")
    monkeypatch.setattr(ce2, "version", lambda name: "0.19.0")
    with pytest.raises(ConfigError, match="pinned to 0.20.0"):
        ce2.check_cell_eval2("vcc2026")


def test_cli_preset_needs_the_cell_eval2_scorer(tmp_path, capsys):
    args = ["evaluate", "--data", "d.h5ad", "--split", "s.json", "--out", str(tmp_path / "o"), "--preset", "v2"]
    assert main(args) == 2
    assert "--preset applies only to --scorer cell-eval2" in capsys.readouterr().err
    assert main([*args[:-2], "--scorer", "cell-eval2", "--preset", "nope"]) == 2
    assert "unknown cell-eval2 preset 'nope'" in capsys.readouterr().err  # before the data is read
