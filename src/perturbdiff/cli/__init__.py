"""The ``perturbdiff`` command: one small module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

from perturbdiff._errors import PerturbDiffError
from perturbdiff._logging import end_cli_logging, setup_cli_logging

# subcommand -> module under perturbdiff.cli; each module defines add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": "Run the whole pipeline on built-in synthetic data and write a report.",
    "preprocess": "Validate an AnnData, normalise, select genes and record every step.",
    "split": "Draw a reproducible train/val/test split of conditions and save it as JSON.",
    "train": "Train PerturbDiff on a preprocessed AnnData and a split.",
    "pretrain": "Pretrain on unperturbed cells of several data sets (context only; marginal pretraining).",
    "finetune": "Train on a perturbation task starting from a pretrained run.",
    "predict": "Generate predicted cells for the conditions of a split (or for your own control cells).",
    "evaluate": "Score predictions with cell-eval and R² against the real cells and the baselines.",
    "baseline": "Fit a baseline (control, mean, additive, linear) and write its predictions.",
    "info": "List what a trained run knows: genes, perturbations, contexts, preprocessing, split.",
    "simulate": "Write the built-in synthetic Perturb-seq-like data set to an .h5ad file.",
}


def _load(name: str):
    return importlib.import_module(f"perturbdiff.cli.{name}")


def build_parser(available: dict[str, object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perturbdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        try:
            mod = _load(name)
        except ModuleNotFoundError as e:
            if e.name != f"perturbdiff.cli.{name}":
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_cli_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except PerturbDiffError as e:
        print(f"perturbdiff {args.command}: error: {e.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perturbdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        end_cli_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
