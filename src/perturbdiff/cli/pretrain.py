"""``perturbdiff pretrain``: marginal pretraining on several data sets (context only, control stream zero)."""

from __future__ import annotations

import argparse
from pathlib import Path

from perturbdiff._errors import DataError
from perturbdiff.cli.train import add_config_arguments, resolve_config, speak_on_rank0, train_in_group


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", metavar="DATA.h5ad",
                   help="data sets: preprocessed by `perturbdiff preprocess` (their genes; their control cells are "
                        "the targets) or plain AnnData without perturbations (all cells; give --context-keys)")
    p.add_argument("--names", help="comma-separated data set names (default: the file stems)")
    p.add_argument("--context-keys", action="append", default=[], metavar="[NAME=]COL[,COL]",
                   help="context column(s) of a data set; NAME= selects the data set, without it the columns apply "
                        "to every data set lacking a record (repeatable). Default for preprocessed files: their "
                        "recorded context columns")
    p.add_argument("--all-cells", metavar="NAME[,NAME]",
                   help="data sets whose perturbed cells are targets too (context only, as unperturbed cells); never "
                        "the task you will finetune on: its held-out perturbed cells would leak")
    p.add_argument("--input-kind", choices=["counts", "log1p"],
                   help="what X holds in the files without a PerturbDiff record; never guessed")
    p.add_argument("--n-hvg", type=int, default=2000,
                   help="HVGs chosen per data set without a record (merge-then-select: the vocabulary is the union)")
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.csv, config.toml")


def _context_keys(specs: list[str], names: list[str]) -> tuple[dict[str, list[str]], list[str] | None]:
    """Per-data-set context columns from NAME=COL,COL specs, and the default for unnamed ones."""
    per, default = {}, None
    for spec in specs:
        name, sep, cols = spec.rpartition("=")
        cols_list = [c.strip() for c in cols.split(",") if c.strip()]
        if sep and name not in names:
            raise DataError(f"--context-keys names data set {name!r}, not one of {', '.join(names)}")
        if sep:
            per[name] = cols_list
        else:
            default = cols_list
    return per, default


def run(args: argparse.Namespace) -> int:
    from perturbdiff._logging import logger
    from perturbdiff.data import marginal_source
    from perturbdiff.datasets import read_h5ad
    from perturbdiff.model import Pretrained

    speak_on_rank0()
    args.fraction = None
    cfg = Pretrained.check_config(resolve_config(args))
    names = [n.strip() for n in args.names.split(",")] if args.names else [Path(d).stem for d in args.data]
    if len(names) != len(args.data):
        raise DataError(f"--names gives {len(names)} names for {len(args.data)} data sets")
    per, default = _context_keys(args.context_keys, names)
    every = [n.strip() for n in args.all_cells.split(",")] if args.all_cells else []
    unknown = [n for n in every if n not in names]
    if unknown:
        raise DataError(f"--all-cells names data set {unknown[0]!r}, not one of {', '.join(names)}")
    sources = [marginal_source(read_h5ad(path), name, context_keys=per.get(name) or default,
                               input_kind=args.input_kind, n_hvg=args.n_hvg, all_cells=name in every)
               for path, name in zip(args.data, names)]
    model = Pretrained.from_sources(cfg, sources)
    out = Path(args.out)
    logger.info("preset %s, %d steps, run directory %s", cfg.preset, cfg.train.max_steps, out)
    if train_in_group(lambda: model.train(sources, out_dir=out, progress=not args.no_progress,
                                          resume=not args.no_resume, device=args.device)):
        print(f"pretrained {model.trainer.state.step} steps on {len(sources)} data sets, {len(model.genes)} genes, "
              f"{len(model.vocab.contexts[0]) - 1} contexts; checkpoints in {out}")
    return 0
