"""``PerturbDiff.debias``: prediction-powered pseudobulks of predicted conditions, corrected by the model's error on
related measured conditions it never trained on (the estimator and why it is valid: ``evaluate._debias``).

The result is one AnnData of conditions × genes: X the debiased mean log1p expression, layers ``generated`` (the
model's own pseudobulk), ``control`` (the context's real control mean), ``lower`` / ``upper`` (the prediction
interval of a measured pseudobulk), ``pvalue`` / ``qvalue`` (response ≠ 0, Benjamini–Hochberg per condition) and
``de`` (called at ``fdr``); obs the condition and its number of called genes; uns ``debias`` how it was made.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data import Condition, align_genes, condition_codes, group_means, labels
from perturbdiff.evaluate import MIN_RELATED, debias_responses

#: the response size (log1p) a DE call must exceed: chosen on the shared splits' validation targets, where every call
#: of a plain t-test (τ = 0) was a small shift shared by the related conditions that no cell-level test found
#: (docs/BENCHMARKS.md, "Prediction-powered debiasing")
MIN_EFFECT = 0.05
#: the sampler settings a prediction records that a prediction of the related conditions must repeat
_REPEATED = ("guidance", "steps", "start", "solver", "n_samples", "seed")


def _moments(X, codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [n, G], variance of the mean [n, G] and size [n] of each group of rows of X (codes < 0 ignored)."""
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    mean = group_means(X, codes, n)
    sq = group_means(X.multiply(X).tocsr(), codes, n)
    size = np.bincount(codes[codes >= 0], minlength=n).astype(np.float64)
    var = np.maximum(sq - mean**2, 0.0) * (size / np.maximum(size - 1, 1))[:, None]
    return mean, var / np.maximum(size, 1)[:, None], size


def codes_of(adata: AnnData, keys, wanted: Sequence[Condition]) -> np.ndarray:
    """Per cell of ``adata``: the index of its condition in ``wanted``, else -1."""
    code, present = condition_codes(adata, keys)
    where = {c: i for i, c in enumerate(wanted)}
    lookup = np.asarray([where.get(c, -1) for c in present], np.int64)
    return lookup[code]


def _controls(adata: AnnData, keys, contexts: Sequence[tuple[str, ...]]) -> np.ndarray:
    """The real control mean of each context [len(contexts), G]."""
    uniq = list(dict.fromkeys(contexts))
    mean, _, size = _moments(adata.X, codes_of(adata, keys, [(c, keys.control_value) for c in uniq]), len(uniq))
    missing = [c for c, n in zip(uniq, size) if n == 0]
    if missing:
        raise DataError(f"no control cells for context(s) {', '.join('/'.join(c) for c in missing)}")
    return mean[[uniq.index(c) for c in contexts]]


def generated_responses(pred: AnnData, keys, conditions: Sequence[Condition], controls: np.ndarray):
    """Generated response [J, G] (predicted mean − ``controls``) of each condition and its sampling variance."""
    is_pred = pred.obs["predicted"].to_numpy(bool) if "predicted" in pred.obs else np.ones(pred.n_obs, bool)
    codes = np.where(is_pred, codes_of(pred, keys, conditions), -1)
    mean, var, size = _moments(pred.X, codes, len(conditions))
    empty = [c for c, n in zip(conditions, size) if n == 0]
    if empty:
        raise DataError(f"the prediction holds no predicted cells of {labels(empty)}")
    return mean - controls, var


def measured_responses(adata: AnnData, keys, conditions: Sequence[Condition]) -> tuple[np.ndarray, np.ndarray]:
    """Measured response [K, G] (mean log1p − the context's control mean) of each condition, and those controls."""
    ctrl = _controls(adata, keys, [c for c, _ in conditions])
    mean, _, _ = _moments(adata.X, codes_of(adata, keys, conditions), len(conditions))
    return mean - ctrl, ctrl


def check_related(run, related: Sequence[Condition] | None, targets: Sequence[Condition],
                  adata: AnnData) -> list[Condition]:
    """The related conditions (default: the split's validation ones), checked to be measured, held out of training
    and apart from the targets — one DataError naming every problem, before any generation."""
    split = run.split
    if related is None:
        if split is None:
            raise DataError("debiasing needs related measured conditions: the model has no split, pass related=")
        related = split.val
        origin = "the split's validation conditions"
    else:
        origin = "related="
    related = [(tuple(map(str, c)), str(p)) for c, p in related]
    problems = []
    if len(related) < MIN_RELATED:
        problems.append(f"debiasing needs at least {MIN_RELATED} measured conditions held out of training; "
                        f"{origin} hold {len(related)}: pass related= with more, or split with more validation "
                        "conditions")
    trained = set(split.train) if split is not None else set()
    in_sample = [c for c in related if c in trained]
    if in_sample:
        problems.append(f"related condition(s) {labels(in_sample)} were trained on: their error is in-sample and "
                        "would understate the bias")
    overlap = [c for c in related if c in set(targets)]
    if overlap:
        problems.append(f"related condition(s) {labels(overlap)} are also predicted targets")
    counts = np.bincount(codes_of(adata, run.keys, related) + 1, minlength=len(related) + 1)[1:]
    unmeasured = [c for c, n in zip(related, counts) if n == 0]
    if unmeasured:
        problems.append(f"related condition(s) {labels(unmeasured)} have no measured cells in the AnnData")
    if problems:
        raise DataError("; ".join(problems))
    return related


def debias(run, pred: AnnData, *, related: Sequence[Condition] | None = None, adata: AnnData | None = None,
           level: float = 0.9, fdr: float = 0.05, lam: float | None = None, min_effect: float = MIN_EFFECT,
           progress: bool = True, device=None) -> AnnData:
    """Prediction-powered pseudobulks of the conditions predicted in ``pred`` (see the module docstring)."""
    adata = adata if adata is not None else run.adata
    if adata is None:
        raise DataError("debiasing needs the AnnData with the related conditions' measured cells (pass adata=)")
    if not 0 < fdr < 1:
        raise DataError(f"fdr must lie in (0, 1); got {fdr}")
    keys = run.keys
    obs = pred.obs[pred.obs["predicted"].to_numpy(bool)] if "predicted" in pred.obs else pred.obs
    cols = [*keys.context_keys, keys.pert_key]
    missing = [c for c in cols if c not in obs]
    if missing:
        raise DataError(f"the prediction lacks column(s) {', '.join(missing)}: pass a PerturbDiff prediction")
    targets = list(dict.fromkeys((tuple(r[:-1]), r[-1]) for r in obs[cols].astype(str).itertuples(index=False)))
    adata = align_genes(adata, run.genes)
    related = check_related(run, related, targets, adata)
    entry = pred.uns.get("perturbdiff", {})
    settings = json.loads(entry["settings"]) if "settings" in entry else {}
    repeat = {k: settings[k] for k in _REPEATED if k in settings}
    logger.info("debiasing %d condition(s) with %d related held-out condition(s): %s", len(targets), len(related),
                labels(related))
    rel_pred = run.predict(related, adata=adata, include_controls=False, progress=progress, device=device,
                           unknown_perturbations="generic", **repeat)
    real_rel, ctrl_rel = measured_responses(adata, keys, related)
    gen_rel, _ = generated_responses(rel_pred, keys, related, ctrl_rel)
    ctrl_t = _controls(adata, keys, [c for c, _ in targets])
    gen_t, var_t = generated_responses(pred, keys, targets, ctrl_t)
    res = debias_responses(real_rel, gen_rel, gen_t, lam=lam, level=level, target_var=var_t, min_effect=min_effect)
    called = res.called(fdr)
    frame = pd.DataFrame([(*c, p) for c, p in targets], columns=cols)
    frame["n_de"] = called.sum(1)
    frame.index = [f"{'/'.join(c)}/{p}" for c, p in targets]
    out = AnnData(X=(ctrl_t + res.delta).astype(np.float32), obs=frame,
                  var=pd.DataFrame(index=pd.Index(list(run.genes))))
    for name, value in {"generated": ctrl_t + gen_t, "control": ctrl_t, "lower": ctrl_t + res.lower,
                        "upper": ctrl_t + res.upper, "pvalue": res.pvalue, "qvalue": res.qvalue}.items():
        out.layers[name] = value.astype(np.float32)
    out.layers["de"] = called.astype(np.int8)
    out.uns["debias"] = {"lam": res.lam, "level": level, "fdr": fdr, "min_effect": min_effect,
                         "n_related": res.n_related,
                         "related": [f"{'/'.join(c)}/{p}" for c, p in related], "settings": json.dumps(repeat),
                         "space": "log1p", "method": "prediction-powered (PPI++), t prediction interval"}
    logger.info("debiased with lambda %.2f over %d related conditions: %s DE genes called per condition at FDR %g",
                res.lam, res.n_related, ", ".join(str(int(n)) for n in frame["n_de"]), fdr)
    return out
