"""THE generation path every prediction takes (split conditions, the user's own controls, zero-shot):
plan sets → covariates per set → ``process.sample`` in batches → the codec's zero floor; ``codec.from_model``
turns the result into log1p for the output."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._threads import auto_active, calibrate
from perturbdiff.config import Config, SampleConfig
from perturbdiff.data import Split, dose_number, draw_positions, row_reader


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SetPlan:
    """The sets to generate: condition index [N] and sample id [N] of each, its control rows [N, S] (None: the
    control stream is zero, as in zero-shot prediction from a marginal model)."""

    cond: np.ndarray
    sample: np.ndarray
    rows: np.ndarray | None
    set_size: int

    def __len__(self) -> int:
        return len(self.cond)


def plan_sets(n_cells: Sequence[int], set_size: int, n_samples: int, seed: int,
              pools: Sequence[np.ndarray] | None = None) -> SetPlan:
    """⌈n / S⌉ sets per condition and sample, ordered by (sample, condition); control rows drawn from each
    condition's pool (seeded by (seed, sample, condition)) when ``pools`` are given."""
    S, rows, cond, sample = set_size, [], [], []
    for k in range(n_samples):
        for i, n in enumerate(n_cells):
            n_sets = math.ceil(n / S)
            if n_sets == 0:
                continue
            if pools is not None:
                pos, _ = draw_positions(np.random.default_rng([seed, k, i]), len(pools[i]), n_sets, S)
                rows.append(pools[i][pos])
            cond += [i] * n_sets
            sample += [k] * n_sets
    if pools is None:
        ctrl = None
    else:
        ctrl = np.concatenate(rows) if rows else np.zeros((0, S), np.int64)
    return SetPlan(np.asarray(cond, np.int64), np.asarray(sample, np.int64), ctrl, S)


@torch.no_grad()
def generate(run, plan: SetPlan, cov: dict[str, np.ndarray], *, X=None, n_genes: int | None = None, settings,
             seed: int = 0, device=None, progress: bool = True, codec=None, network=None,
             batch_size: int = 64, offsets: np.ndarray | None = None) -> np.ndarray:
    """Model-space cells [N, S, G] for every planned set: ``run.process.sample`` with the run's (or ``network``'s)
    weights, in batches of ``batch_size`` sets (batch c draws its noise from ``seed * 1_000_003 + c``), control sets
    from the rows of ``X`` through the codec (plus ``offsets[i]``, the model-space anchor of condition i, when
    given), values under the codec's floor zeroed. ``cov``: covariates per set [N, ...]."""
    codec = codec or run.codec
    device = torch.device(device or default_device())
    net = (network or run.network).to(device).eval()
    X = None if X is None else row_reader(X)  # in-memory CSR or a store's lazy rows
    G = codec.width(X.shape[1] if X is not None else int(n_genes))  # model-space width
    N, S = len(plan), plan.set_size
    out = np.zeros((N, S, G), np.float32)

    def inputs(sl: slice):
        if plan.rows is None:
            ctrl = torch.zeros(sl.stop - sl.start, S, G)
        else:
            ctrl = torch.from_numpy(codec.to_model(X[plan.rows[sl].ravel()].toarray().astype(np.float32, copy=False)))
            ctrl = ctrl.view(-1, S, G)
            if offsets is not None:
                ctrl = ctrl + torch.from_numpy(np.asarray(offsets, np.float32)[plan.cond[sl]])[:, None, :]
        return ctrl.to(device), {k: torch.from_numpy(np.ascontiguousarray(v[sl])).to(device) for k, v in cov.items()}

    first = inputs(slice(0, min(batch_size, N))) if N else None
    if N and auto_active(device):  # --threads auto: one sampler step of the first batch, timed per thread count
        one_step = dataclasses.replace(settings, steps=1, start="full", solver="euler")
        calibrate(lambda: run.process.sample(net, *first, one_step, generator=torch.Generator().manual_seed(0)),
                  "sampler step")
    for c in tqdm(range(0, N, batch_size), disable=not progress, desc="sample", unit="batch", dynamic_ncols=True):
        sl = slice(c, min(c + batch_size, N))
        ctrl, cv = first if c == 0 else inputs(sl)
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + c)
        x0 = run.process.sample(net, ctrl, cv, settings, generator=gen)
        out[sl] = codec.zero_floor(x0).float().cpu().numpy()
    return out


def per_condition(cells: np.ndarray, plan: SetPlan, n_cells: Sequence[int], n_samples: int) -> list[np.ndarray]:
    """Cells [n_i, G] per (sample, condition), in that order, trimmed to each condition's count."""
    G = cells.shape[2]
    return [cells[(plan.cond == i) & (plan.sample == k)].reshape(-1, G)[:n] for k in range(n_samples)
            for i, n in enumerate(n_cells)]


def cells_to_generate(n_cells, conditions: Sequence, *, observed: Sequence[int], split: Split | None = None,
                      subset: str = "test") -> list[int]:
    """Cells per condition: ``n_cells`` (one number or one per condition), else the split's ``test_n_cells`` for
    its own test conditions, else ``observed`` (what the caller counts: real cells, control pool sizes)."""
    if isinstance(n_cells, (int, np.integer)):
        return [int(n_cells)] * len(conditions)
    if n_cells is not None:
        counts = [int(n) for n in n_cells]
        if len(counts) != len(conditions):
            raise DataError(f"n_cells has {len(counts)} values for {len(conditions)} conditions")
        return counts
    if subset == "test" and split is not None and split.test_n_cells and list(conditions) == list(split.test):
        return list(split.test_n_cells)
    return [int(n) for n in observed]


def check_counts(*, n_samples: int = 1, n_cells=None) -> None:
    """``n_samples`` and every ``n_cells`` at least 1 (one ConfigError before any work)."""
    if int(n_samples) < 1:
        raise ConfigError(f"n_samples must be at least 1, got {n_samples}")
    if n_cells is not None:
        values = [n_cells] if isinstance(n_cells, (int, np.integer)) else list(n_cells)
        bad = [n for n in values if int(n) < 1]
        if bad:
            raise ConfigError(f"n_cells must be at least 1, got {bad[0]}")


def check_doses(model, doses: Sequence[str] | None, *, required: bool = True) -> list[str | None]:
    """The doses to generate at: for a run with a dose key, known ones, or numbers when the run encodes doses
    continuously (placed between the seen ones); required unless ``required=False`` (then [] means "the measured
    cells' doses"); refused for a run without a dose key."""
    key = model.keys.dose_key
    doses = [str(d) for d in doses] if doses is not None else []
    if key is None:
        if doses:
            raise DataError(f"doses {doses} were given but the run has no dose key")
        return [None]
    known = model.vocab.dose[1:]
    if not doses and required:
        raise DataError(f"the run was trained with doses (column {key!r}): pass doses, e.g. {', '.join(known[:5])}")
    continuous = model.network.cov_encoder.dose_mlp is not None
    bad = [d for d in doses if d not in known and not (continuous and dose_number(d) is not None)]
    if bad:
        how = "a number >= 0 or one of" if continuous else "the run encodes doses as tokens only; known:"
        raise DataError(f"dose {bad[0]!r} was not seen in training (column {key!r}); give {how} {', '.join(known)}")
    return list(dict.fromkeys(doses))


def dose_units(counts: Sequence[int], doses: Sequence[str | None], measured: Sequence[dict[str, int]],
               labels: Sequence[str]) -> list[tuple[int, str, int]]:
    """(condition index, dose, cells) units: every condition at each of ``doses`` with its count, or, when no doses
    are given, at its measured cells' doses (``measured[i]``: dose -> cells) with its count split in their
    proportions (largest remainders, at least one cell each); a condition with neither is refused by name."""
    if doses:
        return [(i, d, int(n)) for i, n in enumerate(counts) for d in doses]
    missing = [lab for lab, m in zip(labels, measured) if not m]
    if missing:
        raise DataError(f"condition(s) {', '.join(missing[:5])} have no measured cells to take doses from: pass "
                        "doses")
    units = []
    for i, (n, m) in enumerate(zip(counts, measured)):
        names, w = list(m), np.asarray(list(m.values()), np.float64)
        share = n * w / w.sum()
        take = np.maximum(np.floor(share).astype(np.int64), 1)
        for j in np.argsort(-(share - np.floor(share)))[: max(0, n - int(take.sum()))]:
            take[j] += 1
        units += [(i, d, int(t)) for d, t in zip(names, take)]
    return units


def majority(codes: np.ndarray) -> np.ndarray:
    """Most frequent non-negative code per row of [N, S] (-1 where a row has none)."""
    if codes.size == 0:
        return np.zeros(len(codes), np.int64)
    n = max(int(codes.max()) + 2, 2)
    counts = np.stack([(codes == v).sum(1) for v in range(-1, n - 1)], axis=1)  # (N, n)
    counts[:, 0] = 0
    best = counts.argmax(1) - 1
    return np.where(counts.max(1) > 0, best, -1)


def sample_settings(base: SampleConfig, **changes) -> SampleConfig:
    """A copy of sampler settings with those given (None = keep), checked like any config value."""
    out = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    Config(sample=out).validate()
    return out
