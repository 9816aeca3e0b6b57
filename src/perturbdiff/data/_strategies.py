"""Drawing a seeded split (SPEC §1): the four strategies of ``STRATEGIES`` and ``make_split``."""

from __future__ import annotations

import numpy as np

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.data._keys import STRATEGIES, DataKeys
from perturbdiff.data._split import Condition, Split, condition_codes


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _shuffled(items, rng: np.random.Generator) -> list:
    """The sorted items in a seeded random order."""
    items = sorted(items)
    return [items[i] for i in rng.permutation(len(items))]


def _matches(label: str, chosen: set[str]) -> bool:
    """A label is held out if it, or one of its ``+`` parts, was chosen."""
    return label in chosen or any(part in chosen for part in label.split("+"))


def _held_contexts(perturbed: list[Condition], holdout, rng, *, min_perts: int, allow_all: bool) -> tuple:
    """(held-out context tuples, holdout values): a context is held out when one of its values is listed."""
    contexts = sorted({c for c, _ in perturbed})
    if holdout is None:
        n_perts: dict[str, set[str]] = {}
        for c, p in perturbed:
            n_perts.setdefault(c[0], set()).add(p)
        cand = [v for v, ps in n_perts.items() if len(ps) >= min_perts] or list(n_perts)
        holdout = _shuffled(cand, rng)[:1]
    values = {v for c in contexts for v in c}
    for h in holdout:
        if h not in values:
            raise DataError(f"holdout context {h!r} has no perturbed cells in any context column")
    held = {c for c in contexts if any(h in c for h in holdout)}
    if not allow_all and len(held) == len(contexts):
        raise DataError(f"holdout {', '.join(holdout)} covers every context: nothing is left for training")
    return held, list(holdout)


def _contexts_partial(perturbed, keys, rng, holdout, train_fraction, n_val) -> tuple[set, set, list]:
    """Held-out contexts keep a fraction of their perturbations in train; rest: few val, others test."""
    held, holdout = _held_contexts(perturbed, holdout, rng, min_perts=3, allow_all=True)
    perts = _shuffled({p for c, p in perturbed if c in held}, rng)
    n = len(perts)
    n_tr = min(_round(train_fraction * n), n - 1)
    n_v = min(max(1, _round(0.1 * n)) if n_val is None else n_val, n - 1 - n_tr)
    val_p, test_p = set(perts[n_tr : n_tr + n_v]), set(perts[n_tr + n_v :])
    val = {(c, p) for c, p in perturbed if c in held and p in val_p}
    test = {(c, p) for c, p in perturbed if c in held and p in test_p}
    return val, test, holdout


def _contexts(perturbed, keys, rng, holdout, train_fraction, n_val) -> tuple[set, set, list]:
    """Held-out contexts' perturbed conditions are test; val: another held-out context or other conditions."""
    held, holdout = _held_contexts(perturbed, holdout, rng, min_perts=1, allow_all=False)
    if len(holdout) >= 2:
        val_values = set(_shuffled(holdout, rng)[: min(1 if n_val is None else n_val, len(holdout) - 1)])
        val_ctx = {c for c in held if any(v in c for v in val_values)}
        val = {(c, p) for c, p in perturbed if c in val_ctx}
        return val, {(c, p) for c, p in perturbed if c in held - val_ctx}, holdout
    others = [(c, p) for c, p in perturbed if c not in held]
    n_v = min(max(1, _round(0.1 * len(others))) if n_val is None else n_val, len(others) - 1)
    return set(_shuffled(others, rng)[:n_v]), {(c, p) for c, p in perturbed if c in held}, holdout


def _labels_val_test(holdout: list[str], others: list[str], rng, n_val, keep_train: int) -> tuple[set, set]:
    """Split chosen labels into val/test (val from the chosen when >= 2, otherwise drawn from the others)."""
    if len(holdout) >= 2:
        n_v = min(max(1, _round(0.1 * len(holdout))) if n_val is None else n_val, len(holdout) - 1)
        order = _shuffled(holdout, rng)
        return set(order[:n_v]), set(order[n_v:])
    n_v = max(0, min(1 if n_val is None else n_val, len(others) - keep_train))
    return set(_shuffled(others, rng)[:n_v]), set(holdout)


def _perturbations(perturbed, keys, rng, holdout, train_fraction, n_val) -> tuple[set, set, list]:
    """Held-out perturbation labels (and combinations containing them) are val/test in every context."""
    labels = sorted({p for _, p in perturbed})
    parts = {q for p in labels for q in p.split("+")}
    if holdout is None:
        if len(labels) < 2:
            raise DataError(f"column {keys.pert_key!r} has a single perturbation: nothing to hold out")
        holdout = _shuffled(labels, rng)[: min(max(1, _round(0.2 * len(labels))), len(labels) - 1)]
    for h in holdout:
        if h not in parts and h not in labels:
            raise DataError(f"holdout perturbation {h!r} is not in column {keys.pert_key!r}")
    others = [p for p in labels if not _matches(p, set(holdout))]
    if not others:
        raise DataError(f"holdout {', '.join(holdout)} covers every perturbation: nothing is left for training")
    val_l, test_l = _labels_val_test(list(holdout), others, rng, n_val, keep_train=1)
    test = {(c, p) for c, p in perturbed if _matches(p, test_l)}
    val = {(c, p) for c, p in perturbed if _matches(p, val_l)} - test
    return val, test, list(holdout)


def _combinations(perturbed, keys, rng, holdout, train_fraction, n_val) -> tuple[set, set, list]:
    """Held-out combinations A+B (default: half of those with all parts measured singly) are val/test."""
    labels = sorted({p for _, p in perturbed})
    singles = {p for p in labels if "+" not in p}
    combos = [p for p in labels if "+" in p]
    eligible = [p for p in combos if all(q in singles for q in p.split("+"))]
    if holdout is None:
        if not eligible:
            raise DataError(f"no combination A+B in column {keys.pert_key!r} has all its parts measured singly")
        holdout = _shuffled(eligible, rng)[: max(1, _round(0.5 * len(eligible)))]
    for h in holdout:
        if h not in combos:
            raise DataError(f"holdout {h!r} is not a combination label (A+B) in column {keys.pert_key!r}")
    unseen = [h for h in holdout if h not in eligible]
    if unseen:
        logger.info("held-out combination(s) %s have parts never measured singly", ", ".join(unseen))
    others = [p for p in eligible if p not in set(holdout)]
    val_l, test_l = _labels_val_test(list(holdout), others, rng, n_val, keep_train=0)
    return (
        {(c, p) for c, p in perturbed if p in val_l},
        {(c, p) for c, p in perturbed if p in test_l},
        holdout,
    )


_STRATEGY_FNS = dict(zip(STRATEGIES, (_contexts_partial, _contexts, _perturbations, _combinations)))


def make_split(
    adata,
    keys: DataKeys,
    strategy: str,
    *,
    holdout: list[str] | str | None = None,
    seed: int = 0,
    train_fraction: float = 0.3,
    n_val: int | None = None,
) -> Split:
    """Draw a seeded split of the perturbed conditions (controls are never listed: visible everywhere).

    ``holdout``: context values (context strategies: a context is held out when any of its values is listed),
    perturbation labels or parts (held-out-perturbations), combination labels (held-out-combinations); default
    drawn from ``seed``. ``n_val``: number of val perturbations / conditions / contexts (see each strategy).
    """
    if strategy not in _STRATEGY_FNS:
        raise DataError(f"unknown split strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 0.0 <= train_fraction < 1.0:
        raise DataError(f"train_fraction must be in [0, 1), got {train_fraction}")
    code, conds = condition_codes(adata, keys)
    n_cells = dict(zip(conds, np.bincount(code, minlength=len(conds)).tolist()))
    perturbed = sorted(c for c in conds if c[1] != keys.control_value)
    if not perturbed:
        raise DataError(f"the data hold only {keys.control_value!r} cells in column {keys.pert_key!r}: a split "
                        "needs perturbed cells")
    holdout = [holdout] if isinstance(holdout, str) else None if holdout is None else [str(h) for h in holdout]
    rng = np.random.default_rng(seed)
    val, test, holdout = _STRATEGY_FNS[strategy](perturbed, keys, rng, holdout, train_fraction, n_val)
    val = val - test
    if not test:
        raise DataError(f"strategy {strategy!r} with holdout {holdout} left no test conditions")
    test_l = sorted(test)
    return Split(
        name=strategy,
        pert_col=keys.pert_key,
        control=keys.control_value,
        context_cols=list(keys.context_keys),
        train=sorted(set(perturbed) - val - test),
        val=sorted(val),
        test=test_l,
        test_n_cells=[n_cells[c] for c in test_l],
        var_names=None,  # genes are chosen afterwards, on the split's training cells (preprocess --split)
        seed=int(seed),
        strategy=strategy,
        extra={"holdout": holdout},
    )
