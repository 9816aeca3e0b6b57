"""Metrics: cell-eval 0.8.2 per context (each context against its own controls) + R² of pseudobulks.

Reproduces ``cell-eval run --celltype-col CONTEXT --profile full`` through cell-eval's Python API (the CLI's
per-cell-type loop, ``MetricsEvaluator.compute``), then adds ``r2`` = ``r2_score(real pseudobulk, predicted
pseudobulk)`` over genes per condition. Metric names are cell-eval's. Aggregates are the mean over conditions,
skipping NaN; a metric cell-eval leaves undefined (e.g. ``pr_auc`` when the real cells have no DE gene, or
``de_spearman_sig`` with one perturbation per context) stays NaN.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._io import atomic_write_text
from perturbdiff._logging import logger
from perturbdiff.data import group_means
from perturbdiff.evaluate._layout import make_pair
from perturbdiff.evaluate._registry import METRICS, headline, label

KEY_COLS = ["context", "perturbation"]


def _pseudobulks(adata: AnnData, groups: pd.Series) -> tuple[pd.Index, np.ndarray]:
    """Mean row per group label: (labels, (K, G))."""
    codes, labels = pd.factorize(groups, sort=True)
    return pd.Index(labels), group_means(adata.X, codes, len(labels))


def pseudobulk_r2(pred: AnnData, real: AnnData, *, pert_col: str, control: str, context_col: str) -> pd.DataFrame:
    """Per (context, perturbation): ``r2`` = r2_score(real pseudobulk, predicted pseudobulk) over genes, and
    ``r2_delta`` the same for the shifts from the context's real control pseudobulk (absolute R² rewards getting the
    basal profile right, which the control cells alone already do; R² of Δ scores the response only)."""
    from sklearn.metrics import r2_score

    def keyed(a: AnnData) -> pd.Series:
        return a.obs[context_col].astype(str) + "\x1f" + a.obs[pert_col].astype(str)

    p_keys, p_pb = _pseudobulks(pred, keyed(pred))
    r_keys, r_pb = _pseudobulks(real, keyed(real))
    rows = []
    for i, key in enumerate(r_keys):
        ctx, pert = key.split("\x1f")
        if pert == control:
            continue
        j = p_keys.get_loc(key)
        c = r_keys.get_loc(f"{ctx}\x1f{control}") if f"{ctx}\x1f{control}" in r_keys else None
        r2_delta = float(r2_score(r_pb[i] - r_pb[c], p_pb[j] - r_pb[c])) if c is not None else float("nan")
        rows.append({"context": ctx, "perturbation": pert, "r2": float(r2_score(r_pb[i], p_pb[j])),
                     "r2_delta": r2_delta})
    return pd.DataFrame(rows, columns=[*KEY_COLS, "r2", "r2_delta"])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet_scorer(names=("cell_eval", "pdex"), *, prefix: str = "cell-eval", level: int | None = None):
    """Route a scorer's warnings into our log (once per message) instead of Python's last-resort stderr; ``level``
    None logs the routine ones at debug and the rest at info, else all at ``level``. torch's thread count is given
    back too: pdex sets numba's, which sets the OpenMP pool torch shares, so a training after a scoring in one process
    ran at the scorer's count and computed other sums than the same run started afresh (docs/BENCHMARKS.md, "Fifth
    pass")."""
    import torch

    threads = torch.get_num_threads()
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        torch.set_num_threads(threads)
        for lg, (prop, level) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate, lg.level = prop, level
        for msg in dict.fromkeys(m for m in handler.messages if "already exists" not in m):
            # expected with few perturbations per context (metric left NaN) or zero means (inf LFC): debug
            routine = "Error computing metric" in msg or "infinite log2 fold change" in msg
            logger.log(level if level is not None else logging.DEBUG if routine else logging.INFO,
                       f"{prefix}: {msg}")


def _cell_eval_context(
    pred_ct: AnnData,
    real_ct: AnnData,
    *,
    pert_col: str,
    control: str,
    num_threads: int,
    profile: str,
    de_real=None,
    workdir: str,
) -> tuple[pd.DataFrame, object]:
    """One ``MetricsEvaluator`` run (one context); returns per-perturbation metrics and the real DE table."""
    from cell_eval import MetricsEvaluator

    # constant-input / divide warnings from inside cell-eval's metrics; its progress bars (two per context and
    # contender, on stderr) are dropped: "evaluated <contender> in N s" is our one line per contender
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*constant.*")
        evaluator = MetricsEvaluator(
            adata_pred=pred_ct,
            adata_real=real_ct,
            de_real=de_real,
            control_pert=control,
            pert_col=pert_col,
            num_threads=num_threads,
            outdir=workdir,
            prefix=None,
            skip_de=profile == "pds",
        )
        results, _ = evaluator.compute(profile=profile, write_csv=False)
    frame = results.to_pandas()
    de = evaluator.de_comparison.real.data if evaluator.de_comparison is not None else None
    return frame, de


def evaluate(
    pred: AnnData,
    real: AnnData,
    *,
    pert_col: str,
    control: str,
    context_col: str | None,
    num_threads: int = 2,
    profile: str = "full",
    outdir: str | Path | None = None,
    de_cache: dict | None = None,
) -> tuple[pd.DataFrame, pd.Series]:
    """Score ``pred`` against ``real`` (from ``build_real``): per-condition metrics and their mean.

    ``pred`` holds predicted cells only (control cells are taken from ``real``). ``de_cache`` (a dict)
    keeps the real DE tables between calls so several contenders share one real DE computation.
    """
    if context_col is None:
        pred, real, context_col = one_context(pred), one_context(real), "_context"
    pred_full, real = make_pair(pred, real, pert_col=pert_col, control=control, context_col=context_col)
    kw = dict(pert_col=pert_col, control=control, num_threads=num_threads, profile=profile)
    per_cond = _cell_eval_by_context(pred_full, real, context_col, de_cache, **kw)
    r2 = pseudobulk_r2(pred_full, real, pert_col=pert_col, control=control, context_col=context_col)
    if profile == "full":  # a DE metric with no row at all (no real DE gene anywhere) is still a column: NaN
        cell_eval = [m for m in headline() if METRICS[m].cell_eval and m not in per_cond]
        per_cond = per_cond.reindex(columns=[*per_cond.columns, *cell_eval])
    per_cond = per_cond.merge(r2, on=KEY_COLS, how="left")
    aggregate = aggregate_metrics(per_cond)
    if outdir is not None:
        write_tables(per_cond, aggregate.to_frame().T, outdir)
    return per_cond, aggregate


def _cell_eval_by_context(pred_full, real, context_col: str, de_cache: dict | None, **kw) -> pd.DataFrame:
    """``cell-eval run --celltype-col``: each context against its own controls; rows = perturbations."""
    frames = []
    with tempfile.TemporaryDirectory(prefix="perturbdiff-eval-") as work, quiet_scorer():
        for ctx in pd.unique(real.obs[context_col].astype(str)):
            r_ct = real[(real.obs[context_col] == ctx).to_numpy()].copy()
            p_ct = pred_full[(pred_full.obs[context_col] == ctx).to_numpy()].copy()
            cached = None if de_cache is None else de_cache.get(ctx)
            frame, de = _cell_eval_context(p_ct, r_ct, de_real=cached, workdir=work, **kw)
            if de_cache is not None and de is not None:
                de_cache[ctx] = de
            frame.insert(0, "context", ctx)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def one_context(adata: AnnData) -> AnnData:
    """``adata`` with one context for every cell (column ``_context``): data without a context column."""
    obs = adata.obs.copy()
    obs["_context"] = pd.Categorical.from_codes(np.zeros(adata.n_obs, dtype=np.int64), ["all"])
    return AnnData(X=adata.X, obs=obs, var=adata.var)


def aggregate_metrics(per_condition: pd.DataFrame) -> pd.Series:
    """Mean over conditions of every numeric metric column (NaN skipped; all-NaN stays NaN)."""
    numeric = per_condition.drop(columns=[c for c in KEY_COLS + ["contender"] if c in per_condition.columns])
    return numeric.apply(pd.to_numeric, errors="coerce").mean(skipna=True)


def evaluate_predictions(
    preds: dict[str, AnnData],
    real: AnnData,
    *,
    pert_col: str,
    control: str,
    context_col: str | None,
    num_threads: int = 2,
    profile: str = "full",
    outdir: str | Path | None = None,
    return_per_condition: bool = False,
):
    """Evaluate several contenders against the same real cells: DataFrame (contender x metric).

    With ``return_per_condition`` also returns ``{name: per-condition DataFrame}``. With ``outdir``, writes
    ``per_condition.csv`` (all contenders, long) and ``aggregate.csv``.
    """
    if not preds:
        raise DataError("no predictions to evaluate")
    cache: dict = {}
    per: dict[str, pd.DataFrame] = {}
    rows = {}
    for name, pred in preds.items():
        start = time.perf_counter()
        per[name], rows[name] = evaluate(
            pred, real, pert_col=pert_col, control=control, context_col=context_col,
            num_threads=num_threads, profile=profile, de_cache=cache,
        )  # fmt: skip
        logger.info(f"evaluated {name} ({pred.n_obs} predicted cells) in {time.perf_counter() - start:.1f} s")
    table = pd.DataFrame(rows).T
    table.index.name = "contender"
    if outdir is not None:
        long = pd.concat([df.assign(contender=n) for n, df in per.items()], ignore_index=True)
        long = long[["contender", *[c for c in long.columns if c != "contender"]]]
        write_tables(long, table, outdir)
    return (table, per) if return_per_condition else table


def write_tables(per_condition: pd.DataFrame, aggregate: pd.DataFrame, outdir: str | Path) -> None:
    """``per_condition.csv`` and ``aggregate.csv`` under ``outdir`` (atomic writes)."""
    out = Path(outdir)
    atomic_write_text(out / "per_condition.csv", per_condition.to_csv(index=False))
    atomic_write_text(out / "aggregate.csv", aggregate.to_csv(index=aggregate.index.name is not None))


def format_table(table: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> str:
    """Plain-text table of contenders x metrics; NaN shown as —."""
    cols = [c for c in (columns or headline()) if c in table.columns]
    shown = table[cols].apply(pd.to_numeric, errors="coerce")
    text = shown.map(lambda v: "—" if pd.isna(v) else f"{v:.{digits}f}")
    text.columns = [label(c) for c in cols]
    return text.to_string()
