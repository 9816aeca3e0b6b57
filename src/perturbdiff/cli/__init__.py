"""The ``perturbdiff`` command: one small module per subcommand, each with ``add_arguments`` and ``run``.

Only the subcommand being run (or asked for help) is imported, so ``perturbdiff --help`` starts without torch,
anndata or scanpy.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from perturbdiff._errors import PerturbDiffError
from perturbdiff._logging import end_cli_logging, setup_cli_logging
from perturbdiff._version import __version__

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
    "config": "Print the resolved configuration (preset, TOML file, --set) as TOML, or every key.",
}

DESCRIPTION = ("PerturbDiff: predict how populations of single cells respond to perturbations in contexts where they "
               "were never measured, with a diffusion model over sets of cells.")

EXAMPLES = """examples:
  perturbdiff demo                                   # the whole pipeline on synthetic data, with a report
  perturbdiff split raw.h5ad --pert-key perturbation --control-value control --context-keys cell_type \\
      --strategy held-out-contexts-partial --holdout "CD14 Mono" --out split.json
  perturbdiff preprocess raw.h5ad --pert-key perturbation --control-value control --context-keys cell_type \\
      --input-kind counts --split split.json --out data.h5ad      # genes chosen on the training cells
  perturbdiff train data.h5ad --split split.json --out run/       # preset tiny, 2,500 steps (--preset small ...)
  perturbdiff predict run/ --data data.h5ad --out pred.h5ad
  perturbdiff evaluate pred.h5ad --data data.h5ad --split split.json --baselines all --out eval/
  perturbdiff config                                 # every hyper-parameter, as --set and --config take them

`perturbdiff COMMAND --help` describes one command."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown (unless it is empty or already named)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text or default in (None, False, argparse.SUPPRESS, [])
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads auto|N`` for the commands that train or sample (applied before the command runs)."""
    from perturbdiff._threads import parse_threads

    def parse(text: str):
        try:
            return parse_threads(text)
        except PerturbDiffError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--threads", type=parse, default="auto", metavar="auto|N",
                   help="CPU threads: a count, or auto = time the work at 1 and at all cores and keep the faster "
                        "(again at every checkpoint; a loaded machine makes extra threads much slower). "
                        "OMP_NUM_THREADS in the environment is kept under auto")


def _load(name: str):
    return importlib.import_module(f"perturbdiff.cli.{name}")


#: commands whose --out is a folder (the others write one file); --store is always a folder
OUT_FOLDERS = {"train", "pretrain", "finetune", "evaluate", "demo"}
MIN_FREE_BYTES = 16 << 20  # an output file needs at least this much free disk


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output of the command can be written, before any work (OutputError: one line)."""
    from perturbdiff._io import check_writable

    if getattr(args, "out", None):
        check_writable(args.out, folder=args.command in OUT_FOLDERS, need_bytes=MIN_FREE_BYTES)
    if getattr(args, "store", None):  # the store writer makes its folder itself (and refuses a foreign one)
        check_writable(Path(args.store).resolve().parent, folder=True, need_bytes=MIN_FREE_BYTES)


_DISK_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in SUBCOMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its arguments (its module is imported), or all of
    them with ``argv=None``."""
    only = None if argv is None else _chosen(argv)
    parser = argparse.ArgumentParser(prog="perturbdiff", description=DESCRIPTION,
                                     epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"perturbdiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if argv is None or name == only:
            mod = _load(name)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_cli_logging(args.verbose)
    try:
        _check_outputs(args)
        if getattr(args, "threads", None) is not None:
            from perturbdiff._threads import set_threads

            set_threads(args.threads)
        return int(args._run(args) or 0)
    except PerturbDiffError as e:
        print(f"perturbdiff {args.command}: error: {e.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perturbdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a disk that fills up or turns read-only mid-run: one line, not a traceback
        if e.errno not in _DISK_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"perturbdiff {args.command}: error: cannot write{where}: {e.strerror}", file=sys.stderr)
        return 2
    finally:
        end_cli_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
