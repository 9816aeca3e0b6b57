"""``perturbdiff preprocess``: validate, normalise, select genes (on a split's training cells), record it.

``--out`` writes an .h5ad (the data in memory); ``--store`` writes an out-of-core store read in chunks, so the input
never has to fit in memory (with both, the data are processed in memory once and written both ways)."""

from __future__ import annotations

import argparse
import time

from perturbdiff._errors import ConfigError, DataError
from perturbdiff._io import atomic_write
from perturbdiff.data import (
    DataKeys,
    Split,
    condition_codes,  # per-cell codes without per-cell tuples
    preprocess,
    preprocess_store,
    training_mask,
    write_store,
)
from perturbdiff.datasets import read_h5ad


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN.h5ad", help="AnnData with raw counts or log1p values in X")
    p.add_argument("--pert-key", help="obs column holding the perturbation label (leave out, with --control-value, "
                   "for unperturbed atlas data: every cell becomes a control cell, for `perturbdiff pretrain`)")
    p.add_argument("--control-value", help="value of --pert-key that marks control cells")
    p.add_argument("--context-keys", required=True, help="comma-separated obs column(s) defining the context")
    p.add_argument("--batch-key", default=None, help="obs column holding the batch (optional)")
    p.add_argument("--dose-key", default=None, help="obs column holding the dose (optional)")
    p.add_argument("--input-kind", required=True, choices=("counts", "log1p"), help="what X holds; never guessed")
    p.add_argument("--n-hvg", type=int, default=2000, help="number of highly variable genes to keep")
    p.add_argument("--target-sum", type=float, default=1e4, help="normalize_total target for counts input")
    p.add_argument(
        "--split",
        default=None,
        help="split JSON: HVGs on its training cells (train conditions + all controls), or its var_names",
    )
    p.add_argument("--out", metavar="OUT.h5ad", help="where to write the preprocessed AnnData (held in memory)")
    p.add_argument("--store", metavar="DIR", help="write an out-of-core store (cells sorted by condition, read in "
                   "row chunks: the input is never loaded whole); train/predict accept DIR in place of an .h5ad")
    p.add_argument("--chunk-cells", type=int, default=20_000,
                   help="cells per chunk when --store reads the input without --out (bounds memory)")


ATLAS_PERT_KEY, ATLAS_CONTROL = "perturbation", "control"


def _atlas_mode(args: argparse.Namespace) -> bool:
    """No --pert-key and no --control-value: unperturbed atlas data (every cell a control cell)."""
    if (args.pert_key is None) != (args.control_value is None):
        raise ConfigError("--pert-key and --control-value go together (leave both out for atlas data without "
                          "perturbations)")
    if args.pert_key is None and args.split:
        raise ConfigError("--split needs perturbations: atlas data (no --pert-key) take no split")
    return args.pert_key is None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if not args.out and not args.store:
        raise ConfigError("pass --out OUT.h5ad, --store DIR, or both")
    if args.n_hvg < 1:
        raise ConfigError(f"--n-hvg must be at least 1, got {args.n_hvg}")
    if args.target_sum <= 0:
        raise ConfigError(f"--target-sum must be positive, got {args.target_sum}")
    if args.chunk_cells < 1:
        raise ConfigError(f"--chunk-cells must be at least 1, got {args.chunk_cells}")
    contexts = tuple(c.strip() for c in args.context_keys.split(",") if c.strip())
    if not contexts:
        raise DataError("--context-keys names no column")
    atlas = _atlas_mode(args)
    keys = DataKeys(
        pert_key=ATLAS_PERT_KEY if atlas else args.pert_key,
        control_value=ATLAS_CONTROL if atlas else args.control_value,
        context_keys=contexts,
        input_kind=args.input_kind,
        batch_key=args.batch_key,
        dose_key=args.dose_key,
    )
    adata = read_h5ad(args.input, backed=not args.out)  # --store alone: X stays on disk, read in chunks
    if atlas:
        if ATLAS_PERT_KEY in adata.obs:
            raise DataError(f"the atlas already has an obs column {ATLAS_PERT_KEY!r}: pass it as --pert-key")
        adata.obs[ATLAS_PERT_KEY] = ATLAS_CONTROL  # obs is in memory even for a backed file
    train_mask, var_names = None, None
    if args.split:
        split = Split.read(args.split)
        split.check(adata, keys)
        if split.var_names:
            var_names = split.var_names
        else:
            train_mask = training_mask(adata, keys, split)
    kw = {"n_hvg": args.n_hvg, "train_mask": train_mask, "var_names": var_names, "target_sum": args.target_sum}
    if args.out:
        out = preprocess(adata, keys, **kw)
        atomic_write(args.out, out.write_h5ad)
        if args.store:
            write_store(out, args.store)
    else:
        try:
            out = preprocess_store(adata, args.store, keys, chunk_cells=args.chunk_cells, **kw)
        finally:
            adata.file.close()
    _, conditions = condition_codes(out, keys)
    n_ctx = len({c for c, _ in conditions})
    n_cond = sum(p != keys.control_value for _, p in conditions)
    n_train = out.n_obs if train_mask is None else int(train_mask.sum())
    source = "split var_names" if var_names else f"HVGs of {n_train} cells"
    where = " and ".join(str(w) for w in (args.out, args.store) if w)
    print(
        f"wrote {where}: {out.n_obs} cells x {out.n_vars} genes ({source}), {n_cond} perturbed conditions, "
        f"{n_ctx} contexts, input {keys.input_kind} ({time.perf_counter() - t0:.1f} s)"
    )
    if not args.split and not atlas and out.n_vars < adata.n_vars:
        print("note: the genes were chosen on every cell; to hold cells out, draw the split first (perturbdiff "
              "split) and preprocess with --split, so that only its training cells choose them")
    return 0
