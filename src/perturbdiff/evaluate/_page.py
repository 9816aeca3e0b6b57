"""The report's HTML page: the verdict in words, the experiment card, the tables (a best value in bold only when
it clearly beats the runner-up), the figures embedded as base64, the glossary. ``write_report`` (figures) calls
``write_html``."""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbdiff._io import atomic_write, atomic_write_text
from perturbdiff.evaluate._ceiling import CEILING
from perturbdiff.evaluate._metrics import KEY_COLS
from perturbdiff.evaluate._registry import METRICS, headline, is_score, label, lower_is_better
from perturbdiff.evaluate._verdict import LOSS, TIE, TIE_REL, WIN, verdict_lines


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _clear_best(col: pd.Series, metric: str) -> float | None:
    """The best value of a metric column when it beats the runner-up by more than the verdict's tie margin (the
    data ceiling is no contender)."""
    vals = col.drop(index=CEILING, errors="ignore").dropna().sort_values(ascending=lower_is_better(metric)).to_numpy()
    if len(vals) < 2 or not is_score(metric):
        return None
    best, second = float(vals[0]), float(vals[1])
    return best if abs(best - second) > TIE_REL * max(abs(second), 1e-12) else None


def _html_table(table: pd.DataFrame, columns: list[str], highlight: bool) -> str:
    """HTML table, NaN as —; the best contender of a metric in bold only when it beats the runner-up by more than
    2 % (a 0.361 against 0.360 is no win)."""
    cols = [c for c in columns if c in table.columns]
    num = table[cols].apply(pd.to_numeric, errors="coerce")
    best = {c: _clear_best(num[c], c) if highlight else None for c in cols}
    head = "".join(f"<th title='{html.escape(c)}'>{html.escape(label(c))}</th>" for c in cols)
    body = []
    for name, row in num.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            text = "—" if pd.isna(v) else f"{v:.3f}"
            cells.append(f"<td>{'<b>' + text + '</b>' if best[c] is not None and v == best[c] else text}</td>")
        body.append(f"<tr><th>{html.escape(str(name))}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px;font-size:15px}table{border-collapse:collapse;"
    "font-size:14px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    "h2{margin-top:1.5em}.card td,.card th{text-align:left}details{overflow-x:auto}"
)


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


def experiment_card(results: pd.DataFrame, per_condition, model: str | None, preds, real, *, pert_col=None,
                    control=None, context_col=None, baselines=()) -> list[tuple[str, str]]:
    """What was compared, in rows of (what, value): the model run, the held-out conditions, the baselines, the DE
    gene counts; from the prediction's record (``uns['perturbdiff']``) and the tables."""
    rows = []
    entry = (preds or {}).get(model)
    entry = entry.uns.get("perturbdiff", {}) if entry is not None else {}
    if "run" in entry:
        run = json.loads(entry["run"])
        used = f"; the checkpoint used is from step {run['step']}" if run.get("step") is not None else ""
        space = f" over a {run['latent_dim']}-dimensional latent" if run.get("codec") == "latent" else ""
        rows.append(("model", f"{model}: {run.get('process')} process{space}, hidden {run.get('hidden')}, depth "
                              f"{run.get('depth')}, set size {run.get('set_size')}, {run.get('parameters'):,} "
                              f"parameters; a budget of {run.get('max_steps')} training steps{used}"))
    if "settings" in entry:
        st = json.loads(entry["settings"])
        rows.append(("sampling", ", ".join(f"{k} {v}" for k, v in st.items() if v is not None)))
    if per_condition and model in per_condition:
        per = per_condition[model]
        ctxs = sorted(map(str, per["context"].unique()))
        rows.append(("held-out conditions", f"{len(per)} in {len(ctxs)} context(s): {', '.join(ctxs[:8])}"
                                            + (" …" if len(ctxs) > 8 else "")))
    if real is not None and pert_col and context_col:
        is_pert = real.obs[pert_col].astype(str) != str(control)
        counts = real.obs[is_pert].groupby([context_col, pert_col], observed=True).size()
        rows.append(("real cells per condition", f"median {int(counts.median())} (min {counts.min()}, max "
                                                 f"{counts.max()})"))
    if baselines:
        from perturbdiff.baselines import BASELINES

        for b in baselines:
            doc = (BASELINES[b].__doc__ or "").strip().split("\n\n")[0] if b in BASELINES else ""
            rows.append((f"baseline {b}", " ".join(doc.replace("``", "").split())))
    if {"de_nsig_counts_real", "de_nsig_counts_pred"} <= set(results.columns):
        real_n = pd.to_numeric(results["de_nsig_counts_real"], errors="coerce").dropna()
        pred_n = pd.to_numeric(results["de_nsig_counts_pred"], errors="coerce")
        if len(real_n):
            rows.append(("DE genes per condition (FDR < 0.05)", f"real {real_n.iloc[0]:.0f}; "
                         + "; ".join(f"{n} {v:.0f}" for n, v in pred_n.items() if np.isfinite(v))))
    if CEILING in results.index:
        rows.append((CEILING, "cell-eval's ceiling: the real cells split into two disjoint halves, one scored as "
                              "the prediction of the other, Spearman–Brown corrected to full depth; what the data "
                              "allows (bounded scores only)"))
    rows.append(("scores", "mean over the held-out conditions; each context scored against its own control "
                           "cells; error bars: ± 1 standard error over conditions"))
    return rows


def _card_html(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h2>The experiment</h2><table class='card'>{body}</table>"


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


def write_html(out, title, results, per_condition, model, figs, spread, verdicts=None, card=()) -> Path:
    """Write the figures' PNGs under ``out/figures`` and the self-contained ``out/report.html``."""
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
        f"<h1>{html.escape(title)}</h1><p>{stamp}. Metrics from cell-eval 0.8.2 plus R² of pseudobulks (absolute "
        "and of the shift from control), under the short titles of the glossary at the end (hover a column title "
        "for cell-eval's name); mean over conditions; — = undefined.</p>",
        *([_verdict_html(verdicts, model)] if verdicts is not None and len(verdicts) else []),
        *([_card_html(card)] if card else []),
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
