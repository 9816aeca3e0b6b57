"""Prediction-powered means (SPEC §7, dbDiffusion's debiasing made honest): a condition's generated response,
corrected by the observed − generated gap on *related measured conditions the model never trained on*, with a
prediction interval per gene and differential-expression calls against the control cells.

Why it is valid. Let d_j be condition j's real response (pseudobulk mean of log1p expression minus its context's
control mean) and d̂_j the generated one. On K related conditions that were held out of training (the split's
validation conditions, or measured conditions a user kept back), the model's errors r_k = d_k − λ·d̂_k are
out-of-sample, so — with the target condition exchangeable with them — r_target is one more draw from the same
distribution. Hence

    θ̂_j = λ·d̂_j + mean_k r_k,     d_j − θ̂_j ~ (0, σ²·(1 + 1/K)),

and θ̂_j ± t_{K−1, 1−α/2} · s · sqrt(1 + 1/K) (s² the sample variance of r_k, per gene) is a prediction interval for
the response a measurement of condition j would give (the real pseudobulk, sampling noise included). Had the related
conditions been in training, their errors would be in-sample and too small: the interval would under-cover, which is
why they must be held out (cross-fitting). λ interpolates between the model (λ = 1: PPI's rectifier) and the mean
response of the related conditions (λ = 0: an additive baseline over them); ``lam=None`` tunes it for power as PPI++
does, one λ pooled over genes (the slope minimising the summed variance of r, clipped to [0, 1]).

DE calls: per gene, θ̂_j against its standard error sqrt(s²·(1 + 1/K) + λ²·v_j) on K − 1 degrees of freedom (v_j: the
sampling variance of the generated mean), Benjamini–Hochberg within each condition. With ``min_effect`` τ > 0 the null
is |response| ≤ τ (TREAT, McCarthy & Smyth 2009: p = P(T > (|θ̂| − τ)/se) + P(T > (|θ̂| + τ)/se)), so that small
shifts shared by every related condition — real in pseudobulk, invisible to a cell-level test — are not called. The
interval covers the *measured* response, so the test of the true response is conservative.

``ppi_mean`` is the textbook PPI / PPI++ estimate of a mean over target units (ppi-python's ``ppi_mean_ci``
numbers; tested against them): what the per-condition estimator reduces to when the estimand is the average response
over many target conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from perturbdiff._errors import DataError

MIN_RELATED = 2  # a variance needs two related conditions (tuned λ: the interval then has 1 degree of freedom)


@dataclass(frozen=True)
class PPIMean:
    """A prediction-powered mean over target units, per column: estimate, interval, the λ used."""

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    lam: float


def _2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def ppi_mean(y, yhat, yhat_target, *, lam: float | None = None, alpha: float = 0.1) -> PPIMean:
    """PPI (``lam=1``), the classical mean (``lam=0``) or PPI++ (``lam=None``: power-tuned, one λ over columns) of
    the mean outcome of the target units, with a normal (1 − alpha) interval; y, yhat [n, d], yhat_target [N, d]."""
    y, yhat, yt = _2d(y), _2d(yhat), _2d(yhat_target)
    n, N = len(y), len(yt)
    if yhat.shape != y.shape or yt.shape[1] != y.shape[1] or n < 2 or N < 1:
        raise DataError(f"ppi_mean needs y and yhat of one shape [n >= 2, d] and yhat_target [N, d]; got "
                        f"{y.shape}, {yhat.shape}, {yt.shape}")
    if lam is None:
        cov = ((y - y.mean(0)) * (yhat - yhat.mean(0))).mean(0).sum()
        var = np.var(np.concatenate([yhat, yt]), axis=0, ddof=1).sum()
        lam = float(np.clip(cov / ((1 + n / N) * var), 0.0, 1.0)) if var > 0 else 0.0
    est = (lam * yt).mean(0) + (y - lam * yhat).mean(0)
    se = np.sqrt((lam * yt).std(0) ** 2 / N + (y - lam * yhat).std(0) ** 2 / n)
    z = stats.norm.ppf(1 - alpha / 2)
    return PPIMean(est, est - z * se, est + z * se, float(lam))


@dataclass(frozen=True)
class Debiased:
    """Debiased responses of J target conditions over G genes (Δ = mean log1p minus the context's control mean)."""

    delta: np.ndarray  # [J, G] the debiased response θ̂
    lower: np.ndarray  # [J, G] the prediction interval of the measured response
    upper: np.ndarray
    pvalue: np.ndarray  # [J, G] two-sided, response ≠ 0
    qvalue: np.ndarray  # [J, G] Benjamini–Hochberg within each condition
    lam: float
    n_related: int
    level: float

    def called(self, fdr: float = 0.05) -> np.ndarray:
        """[J, G] genes called differentially expressed at this false discovery rate."""
        return self.qvalue < fdr


def tune_lambda(real, generated) -> float:
    """The λ minimising Σ_genes var_k(real − λ·generated) over the related conditions, clipped to [0, 1]."""
    g = generated - generated.mean(0)
    den = float((g * g).sum())
    return float(np.clip(((real - real.mean(0)) * g).sum() / den, 0.0, 1.0)) if den > 0 else 0.0


def debias_responses(real, generated, target, *, lam: float | None = None, level: float = 0.9,
                     target_var=None, min_effect: float = 0.0) -> Debiased:
    """Debias the generated responses ``target`` [J, G] with the real and generated responses of K related held-out
    conditions (``real``, ``generated`` [K, G]); ``target_var`` [J, G]: the sampling variance of each generated mean
    (0 when not given); ``lam``: fixed λ, or None to tune it; ``min_effect``: the response size a DE call must
    exceed (log1p units)."""
    real, generated, target = (np.asarray(a, np.float64) for a in (real, generated, target))
    if real.ndim != 2 or generated.shape != real.shape or target.ndim != 2 or target.shape[1] != real.shape[1]:
        raise DataError(f"debias needs real and generated responses [K, G] and targets [J, G]; got {real.shape}, "
                        f"{generated.shape}, {target.shape}")
    K = len(real)
    if K < MIN_RELATED:
        raise DataError(f"debiasing needs at least {MIN_RELATED} related measured conditions held out of training; "
                        f"got {K}")
    if not 0 < level < 1:
        raise DataError(f"level must lie in (0, 1); got {level}")
    if min_effect < 0:
        raise DataError(f"min_effect must be at least 0; got {min_effect}")
    lam = tune_lambda(real, generated) if lam is None else float(lam)
    r = real - lam * generated
    est = lam * target + r.mean(0)
    v = np.zeros_like(target) if target_var is None else lam**2 * np.asarray(target_var, np.float64)
    se = np.sqrt(r.var(0, ddof=1) * (1 + 1 / K) + v)
    half = stats.t.ppf(0.5 + level / 2, K - 1) * se
    p = _treat_pvalue(np.abs(est), se, min_effect, K - 1)
    q = np.vstack([stats.false_discovery_control(row) for row in p]) if p.size else p
    return Debiased(est, est - half, est + half, p, q, lam, K, level)


def _treat_pvalue(size: np.ndarray, se: np.ndarray, tau: float, df: int) -> np.ndarray:
    """Two-sided p of |response| ≤ tau against a t with ``df`` degrees of freedom (tau = 0: the plain t-test)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(se > 0, (size - tau) / se, np.where(size > tau, np.inf, -np.inf))
        hi = np.where(se > 0, (size + tau) / se, np.inf)
    p = stats.t.sf(lo, df) + stats.t.sf(hi, df)
    return np.minimum(p, 1.0)
