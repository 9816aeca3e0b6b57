"""Which test perturbations each prior route can represent, per split (issue 14): a part is covered when it was
seen in training or the route's block has a row for it; a label when all its parts are.

    python benchmarks/prior_coverage.py --splits devel_combo,devel_unseen --work bench_work   # a minute
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from real_benchmark import SHARED, prepare


def main() -> None:
    from perturbdiff.data import Vocab, build_priors, pert_parts, training_mask, training_shifts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="devel_combo,devel_unseen")
    ap.add_argument("--work", default="bench_work")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", help="also write the table as JSON here")
    args = ap.parse_args()
    rows = []
    print("| split | route | test parts covered | test labels representable | unseen test parts it covers |")
    print("|---|---|---|---|---|")
    for name in args.splits.split(","):
        prep, split, keys = prepare(name, Path(args.work), Path(args.shared))
        seen = set(Vocab.build(prep, keys, split.train).perturbations)
        shifts, parts_of = training_shifts(prep, keys, split.train)
        train_rows = training_mask(prep, keys, split).nonzero()[0]
        labels = sorted({p for _, p in split.test})
        parts = sorted({q for p in labels for q in pert_parts(p)})
        for route in ("none", "coexpression", "knowledge", "effects"):
            covered = set(seen)
            if route != "none":
                (block,) = build_priors([route], X=prep.X, rows=train_rows, genes=list(prep.var_names),
                                        shifts=shifts, parts_of=parts_of, dim=32, neighbours=10, seed=0)
                covered |= set(block.labels)
            n_parts = sum(q in covered for q in parts)
            n_labels = sum(all(q in covered for q in pert_parts(p)) for p in labels)
            new = sorted(q for q in parts if q in covered and q not in seen)
            rows.append({"split": name, "route": route, "parts": [n_parts, len(parts)],
                         "labels": [n_labels, len(labels)], "unseen_covered": new})
            print(f"| {name} | {route} | {n_parts} / {len(parts)} | {n_labels} / {len(labels)} | "
                  f"{', '.join(new) or '—'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
