"""A Perturb-seq-like simulator with planted ground truth: programs, batches, hidden factors, NB counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbdiff._errors import ConfigError

CONTROL = "control"
_ROWS = 4096  # cells per block when sampling counts (bounds memory at 20k x 1k)
_DEPTH_PER_GENE = 0.6  # mean library size / n_genes; with _BASE_SD gives 80-90 % zeros
_N_FACTORS = 3  # hidden latent factors
_BASE_SD = 2.0  # spread of log gene abundance (many rarely detected genes)


@dataclass
class _Params:
    """Drawn before the cells: gene programs, context shifts, hidden factors, perturbation effects."""

    base: np.ndarray  # (G,) log relative abundance
    theta: np.ndarray  # (G,) NB inverse dispersion
    programs: list[np.ndarray]  # gene indices per program
    loading: np.ndarray  # (G,) weight of each gene in its program
    ct_shift: np.ndarray  # (K, G)
    batch_shift: np.ndarray  # (B, G)
    batch_depth: np.ndarray  # (B,) multiplicative library-size factor
    factor_w: np.ndarray  # (F, G) hidden factor loadings
    pop_z: np.ndarray  # (B, K, F) hidden population shift per (batch, cell type)
    resp_scale: np.ndarray  # (B, K) response size per population, driven by hidden factor 0
    delta: np.ndarray  # (1 + P + C, K, G) log-space effect; row 0 = control


def gene_names(n_genes: int) -> list[str]:
    width = max(4, len(str(n_genes)))
    return [f"G{i + 1:0{width}d}" for i in range(n_genes)]


def _programs(rng: np.random.Generator, n_genes: int) -> list[np.ndarray]:
    n_prog = max(4, n_genes // 30)
    return [np.sort(p) for p in np.array_split(rng.permutation(n_genes), n_prog)]


def _program_effect(programs, loading, picks: np.ndarray, amps: np.ndarray, n_genes: int) -> np.ndarray:
    """Sum of amplitude x loading over the picked programs: a (G,) log-space shift."""
    out = np.zeros(n_genes)
    for j, a in zip(picks, amps):
        out[programs[j]] += a * loading[programs[j]]
    return out


def _context_params(rng, n_genes, programs, loading, K, B):
    """Cell-type baseline programs, per-gene batch multipliers, hidden factors shifting (batch, cell type)."""
    n_prog = len(programs)
    ct_shift = np.stack(
        [
            _program_effect(programs, loading, rng.choice(n_prog, 2, replace=False), rng.normal(0, 1.2, 2), n_genes)
            + rng.normal(0, 0.25, n_genes)
            for _ in range(K)
        ]
    )
    factor_w = np.stack(
        [
            _program_effect(programs, loading, rng.choice(n_prog, 1), np.array([0.8]), n_genes)
            + rng.normal(0, 0.05, n_genes)
            for _ in range(_N_FACTORS)
        ]
    )
    batch_shift = rng.normal(0, 0.25, (B, n_genes))
    batch_depth = np.exp(rng.normal(0, 0.2, B))
    pop_z = rng.normal(0, 1, (B, K, _N_FACTORS))
    resp_scale = np.exp(0.35 * pop_z[..., 0])
    return ct_shift, batch_shift, batch_depth, factor_w, pop_z, resp_scale


def _effect_classes(rng: np.random.Generator, n: int) -> np.ndarray:
    n_null = max(1, round(0.2 * n)) if n >= 3 else 0
    n_strong = max(1, round(0.4 * n))
    n_weak = max(0, n - n_null - n_strong)
    return rng.permutation(np.array(["strong"] * n_strong + ["weak"] * n_weak + ["null"] * n_null))


def _single_effects(rng, programs, loading, n_genes, K, classes):
    """Per single perturbation: target gene knock-down + program shifts, scaled per cell type. (P, K, G)."""
    n_prog = len(programs)
    targets, hits, out = [], [], np.zeros((len(classes), K, n_genes))
    for p, cls in enumerate(classes):
        n_hit = {"strong": 2, "weak": 1, "null": 0}[cls]
        picks = rng.choice(n_prog, n_hit, replace=False) if n_hit else np.array([rng.integers(n_prog)])
        target = int(rng.choice(programs[picks[0]]))
        targets.append(target)
        hits.append(picks[:n_hit])
        if cls == "null":
            continue
        lo, hi = (1.2, 2.0) if cls == "strong" else (0.3, 0.6)
        amps = rng.uniform(lo, hi, n_hit) * rng.choice([-1.0, 1.0], n_hit)
        eff = _program_effect(programs, loading, picks, amps, n_genes)
        eff[target] = -2.0 if cls == "strong" else -1.0
        out[p] = rng.uniform(0.3, 1.5, (K, 1)) * eff[None, :]  # effect size varies by cell type
    return out, targets, hits


def _combo_effects(rng, programs, loading, singles, classes, n_combos):
    """A+B: log-space sum of the parts; a quarter non-additive (synergy on a new program, or buffering)."""
    P, K, G = singles.shape
    effective = classes != "null"
    both = [(a, b) for a in range(P) for b in range(a + 1, P) if effective[a] and effective[b]]
    rest = [(a, b) for a in range(P) for b in range(a + 1, P) if not (effective[a] and effective[b])]
    pairs = [both[i] for i in rng.permutation(len(both))] + [rest[i] for i in rng.permutation(len(rest))]
    pairs = pairs[:n_combos]  # pairs of effective perturbations first
    n_nonadd = max(1, round(0.25 * len(pairs))) if len(pairs) >= 2 else 0
    kinds = ["none"] * (len(pairs) - n_nonadd) + list(rng.choice(["synergy", "buffering"], n_nonadd))
    kinds = list(rng.permutation(kinds)) if kinds else []
    out = np.zeros((len(pairs), K, G))
    for c, ((a, b), kind) in enumerate(zip(pairs, kinds)):
        out[c] = singles[a] + singles[b]
        if kind == "buffering":
            out[c] *= 0.5
        elif kind == "synergy":
            extra = _program_effect(programs, loading, [rng.integers(len(programs))], [1.5], G)
            out[c] += extra[None, :]
    return out, pairs, [str(k) for k in kinds]


def _assign_cells(rng, n_cells, K, B, n_conditions, control_fraction):
    """Cell type, batch and condition per cell (condition 0 = control)."""
    ct_p = rng.uniform(0.5, 1.5, K)
    b_p = rng.uniform(0.7, 1.3, B)
    cond_p = np.full(n_conditions, (1 - control_fraction) / max(1, n_conditions - 1))
    cond_p[0] = control_fraction if n_conditions > 1 else 1.0
    ct = rng.choice(K, n_cells, p=ct_p / ct_p.sum())
    batch = rng.choice(B, n_cells, p=b_p / b_p.sum())
    cond = rng.choice(n_conditions, n_cells, p=cond_p / cond_p.sum())
    return ct, batch, cond


def _sample_counts(rng, prm: _Params, ct, batch, cond) -> sp.csr_matrix:
    """log-rate = base + cell type + batch + hidden factors + scaled effect; NB(L·softmax(rate), theta)."""
    n, G = len(ct), prm.base.size
    libsize = _DEPTH_PER_GENE * G * prm.batch_depth[batch] * np.exp(rng.normal(0, 0.35, n))  # (N,)
    f32 = {k: getattr(prm, k).astype(np.float32) for k in ("base", "ct_shift", "batch_shift", "factor_w", "delta")}
    theta = np.broadcast_to(prm.theta.astype(np.float32), (_ROWS, G))
    blocks = []
    for a in range(0, n, _ROWS):
        s = slice(a, a + _ROWS)
        k, b, c = ct[s], batch[s], cond[s]
        z = prm.pop_z[b, k] + rng.normal(0, 0.5, (len(k), _N_FACTORS))  # (n, F) cell-level hidden state
        eta = f32["base"] + f32["ct_shift"][k] + f32["batch_shift"][b] + (z @ f32["factor_w"]).astype(np.float32)
        eta += prm.resp_scale[b, k][:, None].astype(np.float32) * f32["delta"][c, k]  # (n, G)
        w = np.exp(eta - eta.max(axis=1, keepdims=True))
        mu = (libsize[s] / w.sum(axis=1, dtype=np.float64))[:, None].astype(np.float32) * w  # (n, G)
        lam = rng.standard_gamma(theta[: len(k)], dtype=np.float32) * (mu / theta[: len(k)])  # Gamma(theta, mu/theta)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    return sp.vstack(blocks, format="csr")


def _draw_params(rng, n_genes, K, B, n_perturbations, n_combos):
    programs = _programs(rng, n_genes)
    loading = rng.uniform(0.5, 1.0, n_genes)
    base = rng.normal(0, _BASE_SD, n_genes)
    theta = np.exp(rng.normal(np.log(2.0), 0.5, n_genes))
    ctx = _context_params(rng, n_genes, programs, loading, K, B)
    classes = _effect_classes(rng, n_perturbations)
    singles, targets, hits = _single_effects(rng, programs, loading, n_genes, K, classes)
    combos, pairs, kinds = _combo_effects(rng, programs, loading, singles, classes, n_combos)
    delta = np.concatenate([np.zeros((1, K, n_genes)), singles, combos])
    prm = _Params(base, theta, programs, loading, *ctx, delta=delta)
    return prm, classes, targets, hits, pairs, kinds


def simulate(
    n_cells: int = 20_000,
    n_genes: int = 1_000,
    *,
    n_cell_types: int = 4,
    n_batches: int = 3,
    n_perturbations: int = 12,
    n_combos: int = 4,
    seed: int = 0,
    control_fraction: float = 0.25,
) -> AnnData:
    """Simulated Perturb-seq counts (float32 CSR of integers) with ground truth in ``uns["simulation"]``.

    Perturbations are named after their target gene; combinations are written ``A+B``; the control value is
    ``"control"``. Each (batch, cell type) population is shifted by hidden factors that no obs column records.
    """
    _check_args(n_cells, n_genes, n_cell_types, n_batches, n_perturbations, n_combos, control_fraction)
    rng = np.random.default_rng(seed)
    K, B = n_cell_types, n_batches
    prm, classes, targets, hits, pairs, kinds = _draw_params(rng, n_genes, K, B, n_perturbations, n_combos)
    genes = gene_names(n_genes)
    singles = [genes[t] for t in targets]
    if len(set(singles)) < len(singles):  # two perturbations hit the same target gene: keep names unique
        singles = [f"{g}_{i + 1}" if singles.count(g) > 1 else g for i, g in enumerate(singles)]
    combos = [f"{singles[a]}+{singles[b]}" for a, b in pairs]
    labels = [CONTROL, *singles, *combos]
    ct, batch, cond = _assign_cells(rng, n_cells, K, B, len(labels), control_fraction)
    X = _sample_counts(rng, prm, ct, batch, cond)
    cts = [f"CT{k + 1}" for k in range(K)]
    batches = [f"batch{b + 1}" for b in range(B)]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical.from_codes(cond, categories=labels),
            "cell_type": pd.Categorical.from_codes(ct, categories=cts),
            "batch": pd.Categorical.from_codes(batch, categories=batches),
        },
        index=pd.Index([f"cell{i + 1:06d}" for i in range(n_cells)]),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    meta = dict(seed=seed, n_cells=n_cells, n_genes=n_genes, control_fraction=control_fraction)
    adata.uns["simulation"] = _truth(prm, genes, cts, batches, singles, classes, hits, combos, pairs, kinds, meta)
    return adata


def _check_args(n_cells, n_genes, n_cell_types, n_batches, n_perturbations, n_combos, control_fraction) -> None:
    for name, v, lo in (
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 8),
        ("n_cell_types", n_cell_types, 1),
        ("n_batches", n_batches, 1),
        ("n_perturbations", n_perturbations, 1),
        ("n_combos", n_combos, 0),
    ):
        if int(v) != v or v < lo:
            raise ConfigError(f"simulate: {name} must be an integer >= {lo}, got {v!r}")
    if n_combos > n_perturbations * (n_perturbations - 1) // 2:
        raise ConfigError(f"simulate: n_combos={n_combos} exceeds the pairs of {n_perturbations} perturbations")
    if not 0 < control_fraction < 1:
        raise ConfigError(f"simulate: control_fraction must be in (0, 1), got {control_fraction!r}")


def _moved(delta_kg: np.ndarray, genes: list[str], cts: list[str]) -> dict:
    """Genes with a planted effect and the natural-log fold change per cell type (parallel lists)."""
    idx = np.flatnonzero(np.abs(delta_kg).max(axis=0) > 0)
    return {
        "genes": [genes[i] for i in idx],
        "log_fc": {ct: [round(float(v), 4) for v in delta_kg[k, idx]] for k, ct in enumerate(cts)},
    }


def _truth(prm, genes, cts, batches, singles, classes, hits, combos, pairs, kinds, meta) -> dict:
    """JSON-serialisable ground truth: what each perturbation moves per cell type; the hidden structure."""
    P = len(singles)
    pert = {
        name: {
            "effect": str(classes[p]),
            "programs": [int(j) for j in hits[p]],
            **_moved(prm.delta[1 + p], genes, cts),
        }
        for p, name in enumerate(singles)
    }
    combo = {
        name: {
            "parts": [singles[a], singles[b]],
            "additive": kinds[c] == "none",
            "interaction": kinds[c],
            **_moved(prm.delta[1 + P + c], genes, cts),
        }
        for c, (name, (a, b)) in enumerate(zip(combos, pairs))
    }
    pops = {f"{b}|{k}": (i, j) for i, b in enumerate(batches) for j, k in enumerate(cts)}
    return {
        **meta,
        "control": CONTROL,
        "cell_types": list(cts),
        "batches": list(batches),
        "log_fc_note": "natural-log fold change of expected expression before library-size renormalisation; "
        "multiplied in each (batch, cell type) population by hidden.response_scale",
        "perturbations": pert,
        "combos": combo,
        "programs": {f"program{j}": [genes[i] for i in p] for j, p in enumerate(prm.programs)},
        "hidden": {
            "n_factors": _N_FACTORS,
            "population_shift": {key: [round(float(v), 4) for v in prm.pop_z[i, j]] for key, (i, j) in pops.items()},
            "response_scale": {key: round(float(prm.resp_scale[i, j]), 4) for key, (i, j) in pops.items()},
        },
    }


def simulate_atlas(n_cells: int = 20_000, n_genes: int = 1_000, *, n_cell_types: int = 8, n_batches: int = 4,
                   seed: int = 0, prefix: str = "AT") -> AnnData:
    """Atlas-like unperturbed counts (no perturbation column): the simulator's control cells, cell types named
    ``{prefix}1 ...``, for marginal pretraining (SPEC §5). Same gene names (G0001, ...) as :func:`simulate`."""
    sim = simulate(math.ceil(n_cells / 0.9) + 16, n_genes, n_cell_types=n_cell_types, n_batches=n_batches,
                   n_perturbations=1, n_combos=0, seed=seed, control_fraction=0.9)
    ctrl = np.flatnonzero(sim.obs["perturbation"].to_numpy() == CONTROL)[:n_cells]
    atlas = sim[ctrl].copy()
    del atlas.obs["perturbation"]
    atlas.obs["cell_type"] = atlas.obs["cell_type"].cat.rename_categories(
        {c: c.replace("CT", prefix) for c in atlas.obs["cell_type"].cat.categories})
    atlas.uns = {"simulation": {"seed": seed, "n_cells": len(ctrl), "n_genes": n_genes, "kind": "atlas"}}
    return atlas
