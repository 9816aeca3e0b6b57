"""Optional second scorer: cell-eval2 0.20.0 (the 2026 Virtual Cell Challenge's), per context, on its replicate scale.

Per context (each against its own controls, as :func:`evaluate`), three cell-eval2 runs give the three numbers of
each scored member: ``u`` = ``compute_metrics(prediction, real)``, ``b`` = ``build_generic_baseline`` (the mean
response over the context's perturbations, emitted as cells: its ``tile`` arm, the one cell-eval2 defines for
log-normalised input) and ``r`` = ``compute_replicate_anchor`` (5 disjoint split halves of the real cells).
``scaled = score_one(u, b, policy with anchor=r)``, the arithmetic of ``score_metrics``' ``from_replicate``
(0 = baseline, 1 = replicate). ``score_metrics`` refuses a whole run when one member has no scale; here that member
stays NaN with the reason in ``note``, and ``mean_scaled`` is the mean over the members that have one. A context
with one perturbation has no scale at all (the mean response of one perturbation is its measurement); its ends
are still reported.

Input is declared ``input_type="lognorm"`` on both sides, never counts: our matrices are log1p of cells normalised
over the full transcriptome and then cut to the highly variable genes, so re-declaring ``expm1(X)`` as counts would
renormalise every cell over the kept genes. Under lognorm cell-eval2 ignores ``target_sum`` and ``bulk_target_sum``
(its expression comparator falls back from ``bulk_lognorm`` to the per-cell ``lognorm`` mean) and takes fold
changes on ``expm1``. A perturbation label that names a measured gene is that gene's perturbation (its target
gene excluded, as cell-eval2 does); any other label (a cytokine, a drug) is declared to have none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbdiff._errors import ConfigError
from perturbdiff.evaluate._layout import make_pair
from perturbdiff.evaluate._metrics import one_context, quiet_scorer

PINNED = "0.20.0"
COLUMNS = ["context", "perturbation", "level", "metric", "value", "baseline", "replicate", "scaled", "note"]


def check_cell_eval2(preset: str) -> None:
    """Before any work: the optional dependency at the pinned version (its numbers are that version's), and a
    preset it can scale."""
    try:
        found = version("cell-eval2")
    except PackageNotFoundError:
        raise ConfigError('the cell-eval2 scorer needs cell-eval2: pip install "perturbdiff[eval2]"') from None
    if found != PINNED:
        raise ConfigError(
            f'cell-eval2 {found} is installed, the scorer is pinned to {PINNED}: pip install "perturbdiff[eval2]"'
        )
    preset_config(preset)


def preset_config(preset: str):
    """cell-eval2's ``EvalConfig`` for a preset; only v2 presets have a replicate anchor."""
    from cell_eval2 import EvalConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the v1 presets' deprecation: refused below
            base = EvalConfig.from_preset(preset)
    except ValueError:
        raise ConfigError(f"unknown cell-eval2 preset {preset!r}; choose vcc2026 or v2") from None
    if base.version != "v2":
        raise ConfigError(
            f"cell-eval2 preset {preset!r} is a {base.version} preset; its replicate anchor needs v2 (vcc2026 or v2)"
        )
    return base


def eval2_config(preset: str, *, pert_col: str, control: str, labels, genes, num_threads: int = 2):
    """The preset's ``EvalConfig`` for log1p input on CPU (see the module docstring for each choice)."""
    base = preset_config(preset)
    genes = set(map(str, genes))
    targets = {str(p): (str(p) if str(p) in genes else None) for p in labels if str(p) != control}
    return replace(base, pert_col=pert_col, control=control, input_type="lognorm", device="cpu",
                   de=replace(base.de, backend="pdex"), num_threads=num_threads, gather_threads=num_threads,
                   target_gene_map=targets)  # fmt: skip


def scored_members(cfg) -> list[str]:
    """The members the preset averages (``vcc2026``: its six), in the preset's order."""
    from cell_eval2.catalog import CATALOG, resolve_metrics

    return [m for m in resolve_metrics(cfg.metrics, version=cfg.version)[0] if CATALOG[m].scoring.scored]


def score_cell_eval2(
    pred: AnnData,
    real: AnnData,
    *,
    pert_col: str,
    control: str,
    context_col: str | None,
    preset: str = "vcc2026",
    num_threads: int = 2,
    refs: dict | None = None,
) -> pd.DataFrame:
    """Score ``pred`` against ``real`` (from ``build_real``) with cell-eval2: a long table (``COLUMNS``).

    Rows: ``level="condition"`` (u and b per perturbation; cell-eval2 scales aggregates only), ``"context"``
    (u, b, r and scaled per member, plus ``mean_scaled``) and ``"all"`` (their mean over contexts). ``refs`` (a
    dict) keeps each context's baseline and anchor, which depend on the real cells only, between contenders.
    """
    check_cell_eval2(preset)
    pairs = context_pairs(pred, real, pert_col=pert_col, control=control, context_col=context_col)
    labels = {p for _, _, r_ct in pairs for p in r_ct.obs[pert_col].unique()}
    cfg = eval2_config(preset, pert_col=pert_col, control=control, labels=labels, genes=pairs[0][2].var_names,
                       num_threads=num_threads)  # fmt: skip
    refs = {} if refs is None else refs
    frames = []
    for ctx, p_ct, r_ct in pairs:
        if (preset, ctx) not in refs:
            refs[(preset, ctx)] = _references(r_ct, cfg)
        frames.append(_score_context(p_ct, r_ct, cfg, refs[(preset, ctx)]).assign(context=ctx))
    return _with_overall(pd.concat(frames, ignore_index=True))[COLUMNS]


def context_pairs(pred: AnnData, real: AnnData, *, pert_col: str, control: str, context_col: str | None) -> list:
    """[(context, pred + real controls, real)] per context, obs = ``pert_col`` only: what cell-eval2 scores."""
    if context_col is None:
        pred, real, context_col = one_context(pred), one_context(real), "_context"
    pred_full, real = make_pair(pred, real, pert_col=pert_col, control=control, context_col=context_col)
    out = []
    for ctx in pd.unique(real.obs[context_col].astype(str)):
        r_ct = _plain(real[(real.obs[context_col] == ctx).to_numpy()], pert_col)
        p_ct = _plain(pred_full[(pred_full.obs[context_col] == ctx).to_numpy()], pert_col)
        out.append((ctx, p_ct, r_ct))
    return out


def _plain(adata: AnnData, pert_col: str) -> AnnData:
    """Only the perturbation column in obs: cell-eval2 copies obs around and needs nothing else."""
    return AnnData(X=adata.X, obs=adata.obs[[pert_col]].astype(str).astype("category"), var=adata.var[[]])


@contextlib.contextmanager
def _cell_eval2_quiet():
    """cell-eval2's and pdex's warnings into our debug log, once each (the table's ``note`` says what matters),
    their progress bars dropped (as for cell-eval)."""
    with quiet_scorer(("cell_eval2", "pdex"), prefix="cell-eval2", level=logging.DEBUG), \
            warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _references(real_ct: AnnData, cfg) -> dict:
    """The context's 0 end (``build_generic_baseline``) and 1 end (``compute_replicate_anchor``), per member."""
    from cell_eval2 import build_generic_baseline

    members = scored_members(cfg)
    one = real_ct.obs[cfg.pert_col].nunique() < 3  # control + one perturbation, whose mean response is itself
    with _cell_eval2_quiet():
        base = build_generic_baseline(real_ct, config=cfg, emit="tile", exclude_target_gene=not one,
                                      allow_degenerate=True)  # fmt: skip
        b_mean = _means(base.agg)
        ask = [m for m in members if math.isfinite(b_mean.get(m, math.nan))]
        r, notes = _anchor(real_ct, cfg, ask) if ask else ({}, {})
    if one:  # the replicate end is still reported, as a reference for the raw values
        notes = dict.fromkeys(members, "one perturbation in this context: the mean-response baseline is the "
                              "measured response, so there is no scale")  # fmt: skip
    return {"base": base, "b": b_mean, "r": r, "anchor_notes": notes, "no_scale": one}


def _anchor(real_ct: AnnData, cfg, members: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Replicate values of ``members``; the anchor refuses a whole run when one member has no value in a split
    half, so then each member is anchored on its own and a refused one keeps the reason."""
    from cell_eval2.anchor import compute_replicate_anchor

    def run(ms: list[str]) -> dict[str, float]:
        _, frame = compute_replicate_anchor(real_ct, config=replace(cfg, metrics=ms))
        return {m: v for m, v in zip(frame["metric"].to_list(), frame["replicate"].to_list()) if m in ms}

    try:
        return run(members), {}
    except ValueError as e:
        if len(members) == 1:
            return {}, {members[0]: _refused(e)}
    values, notes = {}, {}
    for m in members:
        try:
            values.update(run([m]))
        except ValueError as e:
            notes[m] = _refused(e)
    return values, notes


def _refused(e: ValueError) -> str:
    return f"replicate anchor refused: {str(e).splitlines()[0][:160]}"


def _means(agg) -> dict[str, float]:
    """The ``mean`` row of a cell-eval2 wide aggregate as {metric: value}."""
    row = agg.filter(agg["statistic"] == "mean").drop("statistic").to_dicts()[0]
    return {k: (math.nan if v is None else float(v)) for k, v in row.items()}


def _score_context(pred_ct: AnnData, real_ct: AnnData, cfg, ref: dict) -> pd.DataFrame:
    """Per-condition and context rows for one context."""
    from cell_eval2 import aggregate_metrics_wide, compute_metrics
    from cell_eval2.run import metric_output_names

    with _cell_eval2_quiet():
        tidy = compute_metrics(pred_ct, real_ct, config=cfg)
        u_mean = _means(aggregate_metrics_wide(tidy, metrics=metric_output_names(cfg)))
    members = scored_members(cfg)
    u_cond, b_cond = _per_condition(tidy, members), _per_condition(ref["base"].results, members)
    rows = [{"perturbation": p, "level": "condition", "metric": m, "value": u_cond.get((p, m), np.nan),
             "baseline": b_cond.get((p, m), np.nan), "note": ""}
            for p in sorted({p for p, _ in u_cond}) for m in members]  # fmt: skip
    scaled = []
    for m in members:
        u, b, r = u_mean.get(m, math.nan), ref["b"].get(m, math.nan), ref["r"].get(m, math.nan)
        s, note = (math.nan, "") if ref["no_scale"] else scale_member(m, u, b, r)
        note = ref["anchor_notes"].get(m, note)
        scaled.append(s)
        rows.append({"perturbation": "mean", "level": "context", "metric": m, "value": u, "baseline": b,
                     "replicate": r, "scaled": s, "note": note})  # fmt: skip
    ok = [v for v in scaled if math.isfinite(v)]
    rows.append({"perturbation": "mean", "level": "context", "metric": "mean_scaled",
                 "scaled": float(np.mean(ok)) if ok else math.nan,
                 "note": f"{len(ok)} of {len(scaled)} members have a scale"})  # fmt: skip
    return pd.DataFrame(rows)


def scale_member(metric: str, u: float, b: float, r: float) -> tuple[float, str]:
    """(scaled score, why it is NaN): cell-eval2's policy for ``metric`` with its anchor moved to ``r``."""
    from cell_eval2.catalog import CATALOG
    from cell_eval2.scoring import is_degenerate, score_one

    if not (math.isfinite(b) and math.isfinite(r)):
        return math.nan, f"undefined end: baseline={b:.4g}, replicate={r:.4g}"
    try:
        policy = replace(CATALOG[metric].scoring, anchor=float(r), allow_negative_baseline=False)
    except ValueError as e:
        return math.nan, f"replicate {r:.4g} is not a usable anchor: {e}"
    if is_degenerate(b, policy):
        return math.nan, f"no headroom between baseline {b:.4g} and replicate {r:.4g}"
    return float(score_one(u if math.isfinite(u) else None, b, policy)), ""


def _per_condition(tidy, members: list[str]) -> dict[tuple[str, str], float]:
    """{(perturbation, member): value}; a ratio-of-sums member is its components' ratio for one condition."""
    from cell_eval2.catalog import CATALOG

    frame = tidy.to_pandas()
    wide = frame.pivot_table(index="perturbation", columns="metric", values="value", aggfunc="first")
    out = {}
    for m in members:
        derived = CATALOG[m].derived
        if derived is not None and {derived.numerator, derived.denominator} <= set(wide.columns):
            col = wide[derived.numerator] / wide[derived.denominator]
        elif m in wide.columns:
            col = wide[m]
        else:
            continue
        out.update({(str(p), m): float(v) for p, v in col.items()})
    return out


def _with_overall(frame: pd.DataFrame) -> pd.DataFrame:
    """Append ``level="all"``: the mean over contexts of each context row (NaN skipped)."""
    ctx = frame[frame["level"] == "context"]
    mean = ctx.groupby("metric", sort=False)[["value", "baseline", "replicate", "scaled"]].mean()
    n = ctx.groupby("metric", sort=False)["scaled"].apply(lambda s: int(s.notna().sum()))
    notes = [f"scaled in {k} of {ctx['context'].nunique()} contexts" for k in n]
    overall = mean.reset_index().assign(context="all", perturbation="mean", level="all", note=notes)
    return pd.concat([frame, overall], ignore_index=True)


def summary_table(long: pd.DataFrame) -> pd.DataFrame:
    """Contender x member: the scaled scores of the ``level="all"`` rows (``long`` has a ``contender`` column)."""
    rows = long[long["level"] == "all"]
    table = rows.pivot(index="contender", columns="metric", values="scaled")
    order = [m for m in pd.unique(rows["metric"]) if m != "mean_scaled"] + ["mean_scaled"]
    return table.reindex(index=pd.unique(rows["contender"]), columns=order)


def format_summary(table: pd.DataFrame, digits: int = 3) -> str:
    """Plain-text ``summary_table``, short member names (``de_wilcoxon_direction_reach_raw`` -> ``direction_reach``),
    NaN shown as —."""

    def short(metric: str) -> str:
        return metric.removeprefix("de_wilcoxon_").removeprefix("expr_").removesuffix("_raw")

    text = table.map(lambda v: "—" if pd.isna(v) else f"{v:.{digits}f}")
    return text.rename(columns=short).to_string()
