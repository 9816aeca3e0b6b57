"""How often does the judge rule call one configuration worse than itself? (docs/BENCHMARKS.md, ninth pass)

    python benchmarks/rule_noise.py --work bench_work --tag def --splits devel_combo_inner,devel_gbm_inner,devel_unseen

Every pass since the fourth judges a lever against the default by one rule: on each judge split, 3 seeds each, a
lever *loses* if any score (validation ED at 256 cells, pearson_Δ, R², pr_auc, roc_auc, overlap@N, discrimination
l1 / l2 / cosine where defined) is worse than the default's mean by more than max(the default's sd, 0.01), and
*passes* if it loses nowhere and is better by more than that somewhere. This script applies the rule to the default
against itself. It reads a tag with at least 6 seeds per split, scores each seed on the validation conditions as
validation_fixed.py and validation_cell_eval.py do, and caches the scores in ``<work>/<split>/<tag>/per_seed.json``.
It then judges every ordered pair of disjoint 3-seed groups (the first as "default", the second as "lever") over all
the splits together. A lever equal to the default should lose or pass rarely. The share that loses is the rule's
false-veto rate, and the share that passes its false-pass rate. The same count is made for any other rule given in
RULES, so that a rule can be chosen on the default's own seeds before it judges a lever.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_benchmark import SHARED, prepare, read_split  # noqa: E402
from validation_cell_eval import run_scores, zero_share  # noqa: E402
from validation_fixed import scores as fixed_scores  # noqa: E402

# score -> +1 if higher is better, -1 if lower is better
SCORES = {"ed": -1, "pearson_delta": 1, "r2": 1, "pr_auc": 1, "roc_auc": 1, "overlap_at_N": 1,
          "discrimination_score_l1": 1, "discrimination_score_l2": 1, "discrimination_score_cosine": 1}


def per_seed(work: Path, split_name: str, tag: str, shared: Path) -> dict[int, dict[str, float]]:
    """{seed: {score: value}} for every finished run of ``tag``, cached beside the runs."""
    from perturbdiff._io import atomic_write_json
    from perturbdiff.evaluate import build_real

    cache = work / split_name / tag / "per_seed.json"
    have = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    done = sorted((work / split_name / tag).glob("seed*/result.json"))
    todo = [r for r in done if int(r.parent.name[4:]) not in have]
    if todo:
        prep, split, keys = prepare(split_name, work, shared)
        real = build_real(prep, split, "val")
        real_zeros = zero_share(real[real.obs[split.pert_col] != split.control].X)
        for r in todo:
            seed, run = int(r.parent.name[4:]), r.parent / "run"
            row = run_scores(run, prep, split, seed, [None], [None], real_zeros)[0]
            row["ed"] = fixed_scores(run, prep, split, keys, 256)["ed"]
            have[seed] = {k: row[k] for k in SCORES}
            print(f"scored {split_name} {tag} seed {seed}", file=sys.stderr, flush=True)
            atomic_write_json(cache, have)  # scored seeds survive an interrupted run
    return have


def judge(a: np.ndarray, b: np.ndarray, sign: int, margin, sd: float, step: float = 0.0,
          majority: bool = False) -> int:
    """-1: b worse than a past the margin, +1: better past it, 0: neither (a, b: one score over each group's seeds;
    sd: the score's sd over every seed of the tag; step: one rank step of the score in one run, 0 if not a rank).
    majority: "better" also needs most of b's seeds better than every seed of a, so one seed cannot carry it (the
    thirteenth pass: where a's sd is 0, one seed's lucky DE call passed a lever); "worse" is judged as before."""
    if np.isnan(a).any() or np.isnan(b).any():
        return 0
    m = margin(a, b, sd, step)
    d = sign * (b.mean() - a.mean())
    v = -1 if d < -m else (1 if d > m else 0)
    if majority and v > 0 and 2 * int((sign * b > (sign * a).max()).sum()) <= len(b):
        return 0
    return v


def _sd_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The standard error of the difference of the two groups' means."""
    return float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / len(a)))


RULES = {
    # the rule of the fourth to ninth passes
    "max(sd of the default, 0.01)": lambda a, b, sd, step: max(a.std(ddof=1), 0.01),
}
for _k in (2, 3, 4):  # both groups' spread: k standard errors of the difference of the two 3-seed means
    RULES[f"{_k} x s.e. of the difference, at least 0.01"] = (
        lambda a, b, sd, step, k=_k: max(k * _sd_diff(a, b), 0.01))
for _k in (2, 2.5, 3):  # the default's seed-to-seed sd over all its seeds, as the s.e. of a difference of means
    RULES[f"{_k} x s.e. from the default's sd over all its seeds"] = (
        lambda a, b, sd, step, k=_k: k * sd * np.sqrt(2 / len(a)))
# written down for the next pass (ninth pass): where the default never moves a rank score its sd is 0, so one rank
# step in one seed of the lever's group vetoes; the margin is floored at that step
RULES["2.5 x s.e. from the default's sd over all its seeds, at least one rank step of one seed"] = (
    lambda a, b, sd, step: max(2.5 * sd * np.sqrt(2 / len(a)), step / len(a)))
# written down for the next pass (thirteenth pass): the same margin, and "better" borne by most of the lever's seeds
MAJORITY = "the same, and most of the lever's seeds better than every seed of the default"
RULES[MAJORITY] = RULES["2.5 x s.e. from the default's sd over all its seeds, at least one rank step of one seed"]


def rank_steps(split) -> float:
    """How far one rank swap in one context moves a discrimination score of the split's validation conditions in
    one run: 1 / n_c for a condition of a context with n_c >= 2 conditions, averaged over all N conditions (the
    smallest such step)."""
    per_ctx: dict = {}
    for ctx, _ in split.val:
        per_ctx[ctx] = per_ctx.get(ctx, 0) + 1
    ranked = [n for n in per_ctx.values() if n >= 2]
    return (1.0 / max(ranked)) / len(split.val) if ranked else 0.0


def default_sds(table: dict) -> dict[str, dict[str, float]]:
    """{split: {score: the default's sd over all its seeds}}."""
    return {split: {k: float(np.std([r[k] for r in rows.values()], ddof=1)) for k in SCORES}
            for split, rows in table.items()}


def judge_levers(args, table: dict, steps: dict, sd_all: dict) -> None:
    """Each lever's seeds against the default's same seeds, by every rule (the sd over all the default's seeds)."""
    group = [int(x) for x in args.seeds.split(",")]
    print(f"levers against {args.tag}, seeds {group}\n")
    print("| lever | rule | verdict | worse past the margin | better past the margin |")
    print("|---|---|---|---|---|")
    for tag in args.levers.split(","):
        lever = {s: per_seed(Path(args.work), s, tag, Path(args.shared)) for s in table}
        for name, margin in RULES.items():
            worse, better = [], []
            for split, rows in table.items():
                for score, sign in SCORES.items():
                    if any(s not in rows or s not in lever[split] for s in group):
                        continue
                    va = np.array([rows[s][score] for s in group], float)
                    vb = np.array([lever[split][s][score] for s in group], float)
                    v = judge(va, vb, sign, margin, sd_all[split][score],
                              steps[split] if score.startswith("discr") else 0.0, name == MAJORITY)
                    note = f"{split} {score} {vb.mean():.3f} against {va.mean():.3f}"
                    (worse if v < 0 else better if v > 0 else []).append(note)
            verdict = "loses" if worse else ("passes" if better else "ties")
            print(f"| {tag} | {name} | {verdict} | {'; '.join(worse)} | {'; '.join(better)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_work")
    p.add_argument("--tag", default="def")
    p.add_argument("--splits", default="devel_combo_inner,devel_gbm_inner,devel_unseen")
    p.add_argument("--shared", default=str(SHARED))
    p.add_argument("--group", type=int, default=3, help="seeds per group")
    p.add_argument("--levers", default="", help="comma-separated tags to judge against --tag by every rule instead")
    p.add_argument("--seeds", default="0,1,2", help="with --levers: the seeds of both groups")
    args = p.parse_args()
    table = {s: per_seed(Path(args.work), s, args.tag, Path(args.shared)) for s in args.splits.split(",")}
    steps = {s: rank_steps(read_split(s, Path(args.shared))) for s in table}
    sd_all = default_sds(table)
    if args.levers:
        judge_levers(args, table, steps, sd_all)
        return
    seeds = sorted(set.intersection(*(set(v) for v in table.values())))
    if len(seeds) < 2 * args.group:
        sys.exit(f"{args.tag}: {len(seeds)} seeds on every split; two disjoint groups of {args.group} need more")
    pairs = [(a, b) for a in combinations(seeds, args.group) for b in combinations(sorted(set(seeds) - set(a)),
                                                                                     args.group)]
    print(f"{args.tag}, seeds {seeds}, {len(pairs)} ordered pairs of disjoint {args.group}-seed groups\n")
    print("| rule | loses to itself | passes against itself | ties | scores that vetoed most (share of pairs) |")
    print("|---|---|---|---|---|")
    for name, margin in RULES.items():
        verdicts, vetoes = [], {}
        for a, b in pairs:
            worse, better = [], False
            for split, rows in table.items():
                for score, sign in SCORES.items():
                    va = np.array([rows[s][score] for s in a], float)
                    vb = np.array([rows[s][score] for s in b], float)
                    v = judge(va, vb, sign, margin, sd_all[split][score],
                              steps[split] if score.startswith("discr") else 0.0, name == MAJORITY)
                    worse += [f"{split} {score}"] if v < 0 else []
                    better |= v > 0
            for w in worse:
                vetoes[w] = vetoes.get(w, 0) + 1
            verdicts.append("lose" if worse else ("pass" if better else "tie"))
        n = len(pairs)
        top = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(vetoes.items(), key=lambda kv: -kv[1])[:4])
        print(f"| {name} | {verdicts.count('lose') / n:.2f} | {verdicts.count('pass') / n:.2f} | "
              f"{verdicts.count('tie') / n:.2f} | {top} |")


if __name__ == "__main__":
    main()
