"""Evaluation report: PNG figures and one self-contained HTML page (figures embedded as base64).

Figures: metric bars (model next to every baseline), per-condition model-vs-best-baseline scatter,
predicted vs real log fold changes (pseudobulk minus control pseudobulk, log1p space) for the top conditions,
a PCA of real, predicted and control cells per condition, and — when the model's predictions hold K > 1
sampled distributions (obs ``sample``) — the spread of the condition pseudobulk across samples next to the
real data's bootstrap spread.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.figure import Figure

from perturbdiff._io import atomic_write, atomic_write_text
from perturbdiff.data import group_means
from perturbdiff.evaluate._layout import SAMPLE_COL
from perturbdiff.evaluate._metrics import KEY_COLS
from perturbdiff.evaluate._registry import METRICS, headline, is_score, label, lower_is_better, scatter_metrics
from perturbdiff.evaluate._verdict import LOSS, TIE, WIN, verdict_lines, verdict_table

MODEL_COLOR, BASE_COLOR, REAL_COLOR, CTRL_COLOR = "#d62728", "#7f7f7f", "#1f77b4", "#bbbbbb"


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


def fig_metric_bars(table: pd.DataFrame, model: str | None) -> Figure | None:
    """One panel per headline metric: a bar per contender (model in red)."""
    metrics = [m for m in headline() if m in table.columns and table[m].notna().any()]
    if not metrics:
        return None
    ncol = 4
    nrow = -(-len(metrics) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.6 * nrow), layout="constrained")
    names = list(table.index)
    colors = [MODEL_COLOR if n == model else BASE_COLOR for n in names]
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        vals = pd.to_numeric(table[m], errors="coerce").to_numpy()
        ax.bar(range(len(names)), np.nan_to_num(vals), color=colors)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(_title(m), fontsize=9)
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
    fig = Figure(figsize=(3.3 * len(panels), 3.3), layout="constrained")
    for i, (m, b, j) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        x, y = j[f"{m}_b"].to_numpy(float), j[f"{m}_m"].to_numpy(float)
        ax.scatter(x, y, s=14, color=MODEL_COLOR)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
        ax.set_xlabel(f"{b} (best baseline)", fontsize=8)
        ax.set_ylabel(model, fontsize=8)
        ax.set_title(_title(m), fontsize=9)
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


def fig_lfc(preds, real, conds, *, model, other, pert_col, control, context_col) -> Figure | None:
    """Predicted vs real Δ = pseudobulk − control pseudobulk (log1p ≈ natural-log fold change)."""
    if not conds:
        return None
    fig = Figure(figsize=(3.2 * len(conds), 3.3), layout="constrained")
    for i, (ctx, pert) in enumerate(conds):
        ax = fig.add_subplot(1, len(conds), i + 1)
        ctrl = _mean(real, _cond_mask(real, ctx, control, pert_col, context_col))
        x = _mean(real, _cond_mask(real, ctx, pert, pert_col, context_col)) - ctrl
        for name, color in ((other, BASE_COLOR), (model, MODEL_COLOR)):
            if name is None:
                continue
            mask = _cond_mask(preds[name], ctx, pert, pert_col, context_col)
            if mask.any():
                y = _mean(preds[name], mask) - ctrl
                r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
                ax.scatter(x, y, s=5, alpha=0.6, color=color, label=f"{name} (r={r:.2f})")
        lim = float(np.abs(x).max()) or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--")
        ax.set_title(f"{ctx} / {pert}", fontsize=8)
        ax.set_xlabel("real Δ", fontsize=8)
        ax.set_ylabel("predicted Δ", fontsize=8)
        ax.legend(fontsize=6)
    return fig


def fig_pca(pred: AnnData, real: AnnData, conds, *, pert_col, control, context_col, seed=0) -> Figure | None:
    """PCA (fitted on the real cells of the context) of control, real and predicted cells per condition."""
    from sklearn.decomposition import PCA

    if not conds:
        return None
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(3.2 * len(conds), 3.2), layout="constrained")
    for i, (ctx, pert) in enumerate(conds):
        ax = fig.add_subplot(1, len(conds), i + 1)
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
                ax.scatter(z[:, 0], z[:, 1], s=3, alpha=0.5, color=color, label=k)
        ax.set_title(f"{ctx} / {pert}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=3)
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
    fig = Figure(figsize=(max(4.0, 0.6 * len(spread) + 2), 3.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(spread))
    ax.bar(pos - 0.2, spread["pred_sample_sd"], width=0.4, color=MODEL_COLOR, label="across model samples")
    ax.bar(pos + 0.2, spread["real_bootstrap_sd"], width=0.4, color=REAL_COLOR, label="real, bootstrap")
    ax.set_xticks(
        pos,
        [f"{c}/{p}" for c, p in zip(spread["context"], spread["perturbation"])],
        rotation=45,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("mean per-gene SD of pseudobulk", fontsize=8)
    ax.legend(fontsize=7)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _html_table(table: pd.DataFrame, columns: list[str], highlight: bool) -> str:
    """HTML table, NaN as —, the best contender of each metric in bold (unless all tie)."""
    cols = [c for c in columns if c in table.columns]
    num = table[cols].apply(pd.to_numeric, errors="coerce")
    head = "".join(f"<th>{html.escape(label(c))}</th>" for c in cols)
    body = []
    for name, row in num.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            best = (
                highlight
                and is_score(c)
                and num[c].nunique() > 1
                and v == (num[c].min() if lower_is_better(c) else num[c].max())
            )
            text = "—" if pd.isna(v) else f"{v:.3f}"
            cells.append(f"<td>{'<b>' + text + '</b>' if best else text}</td>")
        body.append(f"<tr><th>{html.escape(str(name))}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}h2{margin-top:1.5em}"
)


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
) -> Path:
    """Write ``figures/*.png`` and ``report.html`` (self-contained) under ``outdir``; return the HTML path.

    ``results`` is contender x metric (``evaluate_predictions``); ``model`` defaults to the first
    contender not in ``baselines``. Figures that need cells are drawn when ``preds`` and ``real`` are given.
    """
    out = Path(outdir)
    baselines = [b for b in (baselines or []) if b in results.index]
    model = model or next((n for n in results.index if n not in baselines), None)
    figs: list[tuple[str, str, Figure | None]] = [
        ("metrics", "Metrics (mean over conditions)", fig_metric_bars(results, model))
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
    verdicts = (verdict_table(per_condition, model, baselines, headline())
                if per_condition and model in per_condition and baselines else None)
    return _write_html(out, title, results, per_condition, model, figs, spread, verdicts)


_VERDICT_COLOR = {WIN: "#c7e9c0", TIE: "#eeeeee", LOSS: "#fcbba1"}


def _verdict_html(verdicts: pd.DataFrame, model: str) -> str:
    """The plain sentences and the metric × baseline table of wins, ties and losses (coloured)."""
    lines = "".join(f"<li>{html.escape(t)}</li>" for t in verdict_lines(verdicts, model))
    head = "".join(f"<th>{html.escape(b)}</th>" for b in verdicts.columns)
    body = "".join(
        f"<tr><th>{html.escape(label(m))}</th>"
        + "".join(f"<td style='background:{_VERDICT_COLOR.get(v, '#fff')}'>{html.escape(v)}</td>" for v in row)
        + "</tr>"
        for m, row in verdicts.iterrows())
    return (f"<h2>Verdict</h2><ul>{lines}</ul><p>Per condition, {html.escape(model)} minus the baseline; a win or "
            "loss only when the paired 90 % interval of the mean difference over conditions excludes 0 (fewer "
            "than 3 conditions: a difference above 2 % of the baseline's value), else a tie.</p>"
            f"<table><tr><th></th>{head}</tr>{body}</table>")


def _glossary_html(columns) -> str:
    """Every metric shown: its name as cell-eval gives it, the short title, what it measures, which way is better."""
    rows = []
    for name in columns:
        m = METRICS.get(name)
        if m is None:
            continue
        best = {"higher": "higher is better", "lower": "lower is better"}.get(m.best, "a count")
        rows.append(f"<tr><th>{html.escape(label(name))}</th><td style='text-align:left'>{html.escape(name)}</td>"
                    f"<td style='text-align:left'>{html.escape(m.description)}</td><td>{best}</td></tr>")
    return ("<h2>Glossary</h2><table><tr><th>title</th><th>name</th><th>what it measures</th><th></th></tr>"
            + "".join(rows) + "</table>")


def _write_html(out, title, results, per_condition, model, figs, spread, verdicts=None) -> Path:
    sections = []
    for key, caption, fig in figs:
        if fig is None:
            continue
        png = _png(fig)
        atomic_write(out / "figures" / f"{key}.png", lambda tmp, data=png: Path(tmp).write_bytes(data))
        b64 = base64.b64encode(png).decode("ascii")
        sections.append(f"<h2>{html.escape(caption)}</h2><img src='data:image/png;base64,{b64}'/>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<h1>{html.escape(title)}</h1><p>{stamp}. Metrics from cell-eval (names as cell-eval gives them) "
        "plus r2; mean over conditions; — = undefined.</p>",
        *([_verdict_html(verdicts, model)] if verdicts is not None and len(verdicts) else []),
        "<h2>Summary</h2>",
        _html_table(results, headline(), True),
        "<details><summary>All metrics</summary>",
        _html_table(results, list(results.columns), True),
        "</details>",
        *sections,
    ]
    if spread is not None:
        parts += [
            "<h2>Sample spread table</h2>",
            _html_table(spread.set_index(KEY_COLS), list(spread.columns), False),
        ]
    if per_condition and model in per_condition:
        per = per_condition[model].set_index(KEY_COLS)
        per.index = [f"{c} / {p}" for c, p in per.index]
        parts += [f"<h2>Per condition: {html.escape(model)}</h2>", _html_table(per, headline(), False)]
    parts.append(_glossary_html(list(results.columns)))
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    return atomic_write_text(out / "report.html", page)
