"""Evaluation report: PNG figures and one self-contained HTML page (figures embedded as base64).

Figures: metric bars (model next to every baseline), per-condition model-vs-best-baseline scatter,
predicted vs real log fold changes (pseudobulk minus control pseudobulk, log1p space) for the top conditions,
a PCA of real, predicted and control cells per condition, and — when the model's predictions hold K > 1
sampled distributions (obs ``sample``) — the spread of the condition pseudobulk across samples next to the
real data's bootstrap spread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.figure import Figure

from perturbdiff.data import group_means
from perturbdiff.evaluate._ceiling import CEILING
from perturbdiff.evaluate._layout import SAMPLE_COL
from perturbdiff.evaluate._metrics import KEY_COLS
from perturbdiff.evaluate._page import experiment_card, write_html
from perturbdiff.evaluate._registry import headline, label, lower_is_better, scatter_metrics
from perturbdiff.evaluate._verdict import verdict_table

MODEL_COLOR, BASE_COLOR, REAL_COLOR, CTRL_COLOR, CEIL_COLOR = "#d62728", "#7f7f7f", "#1f77b4", "#bbbbbb", "#9ecae1"
NCOL, PANEL = 3, 3.6  # figures are grids of at most 3 panels a row, 3.6 in each: ≤ 1,200 px wide, never shrunk
FONT, SMALL = 10, 9  # points at 110 dpi: ≥ 13 px on the page at 100 % zoom


def _grid(n: int, ncol: int = NCOL, height: float = PANEL) -> tuple[Figure, list]:
    """A figure of ``n`` panels, ``ncol`` a row."""
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    fig = Figure(figsize=(PANEL * ncol, height * nrow), layout="constrained")
    return fig, [fig.add_subplot(nrow, ncol, i + 1) for i in range(n)]


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _mean(adata: AnnData, mask: np.ndarray) -> np.ndarray:
    """Mean row of the cells in ``mask`` (float64; NaN when there are none)."""
    if not mask.any():
        return np.full(adata.n_vars, np.nan)
    return group_means(adata.X, np.where(mask, 0, -1), 1)[0]


def _title(metric: str) -> str:
    return label(metric) + (" (lower better)" if lower_is_better(metric) else "")


def _cond_mask(adata: AnnData, ctx: str, pert: str, pert_col: str, context_col: str) -> np.ndarray:
    return ((adata.obs[context_col].astype(str) == ctx) & (adata.obs[pert_col].astype(str) == pert)).to_numpy()


def best_baseline(table: pd.DataFrame, metric: str, baselines: list[str]) -> str | None:
    """The baseline with the best aggregate value of ``metric`` (lowest for errors), None if all NaN."""
    vals = pd.to_numeric(table.loc[baselines, metric], errors="coerce").dropna() if baselines else pd.Series()
    if vals.empty:
        return None
    return str(vals.idxmin() if lower_is_better(metric) else vals.idxmax())


def _sem(per_condition, names, metric) -> np.ndarray:
    """Standard error over conditions of each contender's ``metric`` (NaN where unknown)."""
    out = []
    for n in names:
        df = (per_condition or {}).get(n)
        v = pd.to_numeric(df[metric], errors="coerce").dropna() if df is not None and metric in df else pd.Series()
        out.append(float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else np.nan)
    return np.asarray(out)


def fig_metric_bars(table: pd.DataFrame, model: str | None, per_condition=None) -> Figure | None:
    """One panel per headline metric: a bar per contender (model in red), its value written on it; the axis starts
    near the lowest value so that differences between contenders are visible (read the numbers, not the heights)."""
    metrics = [m for m in headline() if m in table.columns and table[m].notna().any()]
    if not metrics:
        return None
    fig, axes = _grid(len(metrics), height=3.0)
    names = list(table.index)
    colors = [MODEL_COLOR if n == model else CEIL_COLOR if n == CEILING else BASE_COLOR for n in names]
    for ax, m in zip(axes, metrics):
        vals = pd.to_numeric(table[m], errors="coerce").to_numpy()
        err = _sem(per_condition, names, m)
        e = np.where(np.isfinite(err), err, 0.0)
        ok = np.isfinite(vals)
        lo, hi = float((vals - e)[ok].min()), float((vals + e)[ok].max())
        pad = 0.1 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
        base = lo - pad if lo - pad > 0 or lo < 0 else 0.0
        ax.bar(range(len(names)), np.nan_to_num(vals - base), bottom=base, color=colors, yerr=e,
               error_kw={"lw": 0.8, "capsize": 2})
        for x, v in enumerate(vals):
            if np.isfinite(v):
                ax.text(x + 0.05, v, f"{v:.3f}", ha="left", va="bottom", fontsize=SMALL - 1)
        ax.set_ylim(base, hi + 2 * pad)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=SMALL)
        ax.tick_params(axis="y", labelsize=SMALL)
        ax.set_title(_title(m), fontsize=FONT)
    return fig


def fig_scatter(per: dict[str, pd.DataFrame], table: pd.DataFrame, model: str, baselines: list[str]) -> Figure | None:
    """Per condition: model (y) vs the best baseline of each metric (x); above y = x favours the model."""
    panels = []
    for m in scatter_metrics():
        b = best_baseline(table, m, baselines) if m in table.columns else None
        if b is None or m not in per[model].columns:
            continue
        joined = per[model][KEY_COLS + [m]].merge(per[b][KEY_COLS + [m]], on=KEY_COLS, suffixes=("_m", "_b")).dropna()
        if len(joined):
            panels.append((m, b, joined))
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (m, b, j) in zip(axes, panels):
        x, y = j[f"{m}_b"].to_numpy(float), j[f"{m}_m"].to_numpy(float)
        ax.scatter(x, y, s=18, color=MODEL_COLOR)
        if len(j) <= 12:  # few conditions: name each point
            for xi, yi, c, p in zip(x, y, j["context"], j["perturbation"]):
                ax.annotate(f"{c}/{p}", (xi, yi), fontsize=SMALL - 2, xytext=(3, 3), textcoords="offset points")
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
        better = "below" if lower_is_better(m) else "above"
        ax.set_xlabel(f"{b} (best baseline)", fontsize=SMALL)
        ax.set_ylabel(f"{model} ({better} the line: {model} better)", fontsize=SMALL)
        ax.tick_params(labelsize=SMALL)
        ax.set_title(_title(m), fontsize=FONT)
    return fig


def top_conditions(real: AnnData, pert_col: str, control: str, context_col: str, n: int = 6) -> list[tuple]:
    """Conditions with the largest real pseudobulk shift ‖Δ‖₂ (context, perturbation)."""
    lab = real.obs[[context_col, pert_col]].astype(str)
    conds = lab[lab[pert_col] != control].drop_duplicates().itertuples(index=False, name=None)
    scored = []
    for ctx, pert in conds:
        ctrl = _mean(real, _cond_mask(real, ctx, control, pert_col, context_col))
        delta = _mean(real, _cond_mask(real, ctx, pert, pert_col, context_col)) - ctrl
        scored.append((float(np.linalg.norm(delta)), ctx, pert))
    return [(c, p) for _, c, p in sorted(scored, reverse=True)[:n]]


FLAT = 0.02  # |real Δ| below this: a gene that does not respond


def fig_lfc(preds, real, conds, *, model, other, pert_col, control, context_col) -> Figure | None:
    """Predicted vs real Δ = pseudobulk − control pseudobulk (log1p ≈ natural-log fold change)."""
    if not conds:
        return None
    fig, axes = _grid(len(conds))
    for ax, (ctx, pert) in zip(axes, conds):
        ctrl = _mean(real, _cond_mask(real, ctx, control, pert_col, context_col))
        x = _mean(real, _cond_mask(real, ctx, pert, pert_col, context_col)) - ctrl
        for name, color in ((other, BASE_COLOR), (model, MODEL_COLOR)):
            if name is None:
                continue
            mask = _cond_mask(preds[name], ctx, pert, pert_col, context_col)
            if mask.any():
                y = _mean(preds[name], mask) - ctrl
                r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
                ax.scatter(x, y, s=6, alpha=0.6, color=color, label=f"{name} (r={r:.2f})")
                flat = np.abs(x) < FLAT
                if name == model and flat.sum() >= 10:  # genes that do not respond: is the prediction biased?
                    bias = float(y[flat].mean())
                    ax.text(0.02, 0.98, f"{flat.sum()} genes with |real Δ| < {FLAT}:\n{model} mean Δ {bias:+.3f}",
                            transform=ax.transAxes, va="top", fontsize=SMALL - 1,
                            color=MODEL_COLOR if abs(bias) > FLAT else "black")
        lim = float(np.abs(x).max()) or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--")
        ax.set_title(f"{ctx} / {pert}", fontsize=FONT)
        ax.set_xlabel("real Δ (log1p, vs control)", fontsize=SMALL)
        ax.set_ylabel("predicted Δ", fontsize=SMALL)
        ax.tick_params(labelsize=SMALL)
        ax.legend(fontsize=SMALL - 1, loc="lower right")
    return fig


def fig_pca(pred: AnnData, real: AnnData, conds, *, pert_col, control, context_col, seed=0) -> Figure | None:
    """PCA (fitted on the real cells of the context) of control, real and predicted cells per condition."""
    from sklearn.decomposition import PCA

    if not conds:
        return None
    rng = np.random.default_rng(seed)
    fig, axes = _grid(len(conds))
    for ax, (ctx, pert) in zip(axes, conds):
        groups = {
            "control": (real, _cond_mask(real, ctx, control, pert_col, context_col), CTRL_COLOR),
            "real": (real, _cond_mask(real, ctx, pert, pert_col, context_col), REAL_COLOR),
            "predicted": (pred, _cond_mask(pred, ctx, pert, pert_col, context_col), MODEL_COLOR),
        }
        cells = {k: _dense(a.X[_subsample(np.flatnonzero(m), 400, rng)]) for k, (a, m, _) in groups.items()}
        pca = PCA(n_components=2).fit(np.concatenate([cells["control"], cells["real"]]))
        for k, (_, _, color) in groups.items():
            if len(cells[k]):
                z = pca.transform(cells[k])  # (n, 2)
                ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.5, color=color, label=k)
        ev = 100 * pca.explained_variance_ratio_
        ax.set_title(f"{ctx} / {pert}", fontsize=FONT)
        ax.set_xlabel(f"PC1 ({ev[0]:.0f} % of real + control variance)", fontsize=SMALL)
        ax.set_ylabel(f"PC2 ({ev[1]:.0f} %)", fontsize=SMALL)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=SMALL - 1, markerscale=3)
    return fig


def _subsample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return idx if len(idx) <= n else np.sort(rng.choice(idx, n, replace=False))


def sample_spread(pred: AnnData, real: AnnData, *, pert_col, control, context_col, seed=0) -> pd.DataFrame | None:
    """Per condition: mean over genes of the SD across the K samples' pseudobulks, and the same SD for K
    bootstrap resamples of the real cells (the spread finite sampling alone gives)."""
    if SAMPLE_COL not in pred.obs.columns:
        return None
    generated = pred.obs["predicted"].astype(bool).to_numpy() if "predicted" in pred.obs else np.ones(pred.n_obs, bool)
    samples = pd.unique(pred.obs[SAMPLE_COL].astype(str).to_numpy()[generated])
    if len(samples) < 2:
        return None
    rng = np.random.default_rng(seed)
    rows = []
    lab = real.obs[[context_col, pert_col]].astype(str)
    for ctx, pert in lab[lab[pert_col] != control].drop_duplicates().itertuples(index=False, name=None):
        mask = _cond_mask(pred, ctx, pert, pert_col, context_col)
        s = pred.obs[SAMPLE_COL].astype(str).to_numpy()
        pbs = np.stack([_mean(pred, mask & (s == k)) for k in samples if (mask & (s == k)).any()])  # (K, G)
        real_x = _dense(real.X[np.flatnonzero(_cond_mask(real, ctx, pert, pert_col, context_col))])
        boot = np.stack([real_x[rng.integers(0, len(real_x), len(real_x))].mean(0) for _ in samples])  # (K, G)
        rows.append(
            {
                "context": ctx,
                "perturbation": pert,
                "n_samples": len(pbs),
                "pred_sample_sd": float(pbs.std(0, ddof=1).mean()),
                "real_bootstrap_sd": float(boot.std(0, ddof=1).mean()),
            }
        )
    return pd.DataFrame(rows)


def fig_spread(spread: pd.DataFrame | None) -> Figure | None:
    """Bars: pseudobulk SD across sampled distributions vs the real bootstrap SD, per condition."""
    if spread is None or spread.empty:
        return None
    fig = Figure(figsize=(min(max(5.0, 0.6 * len(spread) + 2), NCOL * PANEL), 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(spread))
    ax.bar(pos - 0.2, spread["pred_sample_sd"], width=0.4, color=MODEL_COLOR, label="across model samples")
    ax.bar(pos + 0.2, spread["real_bootstrap_sd"], width=0.4, color=REAL_COLOR, label="real, bootstrap")
    ax.set_xticks(
        pos,
        [f"{c}/{p}" for c, p in zip(spread["context"], spread["perturbation"])],
        rotation=45,
        ha="right",
        fontsize=SMALL,
    )
    ax.set_ylabel("mean per-gene SD of pseudobulk", fontsize=SMALL)
    ax.tick_params(axis="y", labelsize=SMALL)
    ax.legend(fontsize=SMALL)
    return fig


def debiased_coverage(bulk: AnnData, real: AnnData, *, pert_col, control, context_col) -> dict[str, float]:
    """Per condition of a ``debias`` result with real cells: the share of genes whose real pseudobulk lies in the
    interval."""
    out = {}
    for name in bulk.obs_names:
        ctx, pert = name.rsplit("/", 1)
        mask = _cond_mask(real, ctx, pert, pert_col, context_col)
        if mask.any():
            r = _mean(real, mask)
            i = bulk.obs_names.get_loc(name)
            lo, hi = _dense(bulk.layers["lower"][i]).ravel(), _dense(bulk.layers["upper"][i]).ravel()
            out[name] = float(np.mean((r >= lo) & (r <= hi)))
    return out


def fig_debiased(bulk: AnnData, real: AnnData, conds, *, pert_col, control, context_col, n_genes: int = 20):
    """Per condition, the genes that respond most: real response, the model's, and the debiased one with its
    interval."""
    shown = [(c, p) for c, p in conds if f"{c}/{p}" in bulk.obs_names]
    if not shown:
        return None
    fig, axes = _grid(len(shown))
    for ax, (ctx, pert) in zip(axes, shown):
        i = bulk.obs_names.get_loc(f"{ctx}/{pert}")
        ctrl = _dense(bulk.layers["control"][i]).ravel()
        real_d = _mean(real, _cond_mask(real, ctx, pert, pert_col, context_col)) - ctrl
        top = np.argsort(-np.abs(real_d))[:n_genes]
        x = np.arange(len(top))
        est = _dense(bulk.X[i]).ravel()[top] - ctrl[top]
        lo = est - (_dense(bulk.layers["lower"][i]).ravel()[top] - ctrl[top])
        hi = _dense(bulk.layers["upper"][i]).ravel()[top] - ctrl[top] - est
        ax.errorbar(x, est, yerr=[lo, hi], fmt="o", ms=3, color="black", lw=0.8, label="debiased, 90 % interval")
        ax.scatter(x, _dense(bulk.layers["generated"][i]).ravel()[top] - ctrl[top], marker="x", s=16,
                   color=MODEL_COLOR, label="model")
        ax.scatter(x, real_d[top], s=14, color=REAL_COLOR, label="real", zorder=3)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(x, [str(g) for g in bulk.var_names[top]], rotation=90, fontsize=SMALL - 2)
        ax.set_ylabel("Δ vs control (log1p)", fontsize=SMALL)
        ax.tick_params(axis="y", labelsize=SMALL)
        ax.set_title(f"{ctx} / {pert}", fontsize=FONT)
        ax.legend(fontsize=SMALL - 2)
    return fig


def write_report(
    results: pd.DataFrame,
    outdir: str | Path,
    *,
    per_condition: dict[str, pd.DataFrame] | None = None,
    preds: dict[str, AnnData] | None = None,
    real: AnnData | None = None,
    pert_col: str | None = None,
    control: str | None = None,
    context_col: str | None = None,
    model: str | None = None,
    baselines: list[str] | None = None,
    title: str = "PerturbDiff evaluation",
    n_top: int = 6,
    debiased: AnnData | None = None,
) -> Path:
    """Write ``figures/*.png`` and ``report.html`` (self-contained) under ``outdir``; return the HTML path.

    ``results`` is contender x metric (``evaluate_predictions``); ``model`` defaults to the first
    contender not in ``baselines``. Figures that need cells are drawn when ``preds`` and ``real`` are given;
    ``debiased`` (``PerturbDiff.debias``'s result) adds its intervals against the real responses.
    """
    out = Path(outdir)
    baselines = [b for b in (baselines or []) if b in results.index]
    model = model or next((n for n in results.index if n not in baselines and n != CEILING), None)
    figs: list[tuple[str, str, Figure | None]] = [
        ("metrics", "Metrics (mean over conditions ± 1 standard error)", fig_metric_bars(results, model,
                                                                                          per_condition))
    ]
    if per_condition and model in per_condition and baselines:
        figs.append(
            (
                "scatter",
                f"Per condition: {model} vs the best baseline",
                fig_scatter(per_condition, results, model, baselines),
            )
        )
    spread = None
    if preds is not None and real is not None and model in preds and pert_col and context_col:
        conds = top_conditions(real, pert_col, control, context_col, n_top)
        other = best_baseline(results, "pearson_delta", baselines) if "pearson_delta" in results else None
        kw = dict(pert_col=pert_col, control=control, context_col=context_col)
        figs.append(
            (
                "lfc",
                "Predicted vs real log fold change, top conditions",
                fig_lfc(preds, real, conds, model=model, other=other, **kw),
            )
        )
        figs.append(("pca", f"PCA of control, real and {model} cells", fig_pca(preds[model], real, conds, **kw)))
        spread = sample_spread(preds[model], real, **kw)
        figs.append(("spread", "Spread between sampled response distributions", fig_spread(spread)))
    coverage = None
    if debiased is not None and real is not None and pert_col and context_col:
        kw = dict(pert_col=pert_col, control=control, context_col=context_col)
        coverage = debiased_coverage(debiased, real, **kw)
        conds = top_conditions(real, pert_col, control, context_col, n_top)
        figs.append(("debiased", "Debiased responses and their 90 % intervals, the most responsive genes",
                     fig_debiased(debiased, real, conds, **kw)))
    verdicts = (verdict_table(per_condition, model, baselines)
                if per_condition and model in per_condition and baselines else None)
    card = experiment_card(results, per_condition, model, preds, real, pert_col=pert_col, control=control,
                           context_col=context_col, baselines=baselines)
    if coverage:
        info = debiased.uns.get("debias", {})
        level, covered = 100 * float(info.get("level", 0.9)), 100 * np.mean(list(coverage.values()))
        card.append(("debiased (prediction-powered)", f"λ {float(info.get('lam', np.nan)):.2f} over "
                     f"{info.get('n_related')} related held-out conditions; the real pseudobulk lies in the "
                     f"{level:.0f} % interval for {covered:.0f} % of genes ({len(coverage)} conditions)"))
    return write_html(out, title, results, per_condition, model, figs, spread, verdicts, card)
