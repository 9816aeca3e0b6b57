"""``perturbdiff predict``: generate predicted cells for a split's conditions (``--data``) or for your own control
cells (``--controls``) with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from perturbdiff._errors import ConfigError, DataError
from perturbdiff.cli import threads_argument

CONTROLS_ONLY = ("perturbations", "context_keys", "input_kind", "pseudobulk", "batch_key", "reference")
DATA_ONLY = ("split", "subset", "debias")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory of `perturbdiff train` or `finetune` (or a .safetensors checkpoint); "
                               "a `perturbdiff pretrain` run predicts zero-shot (needs --data and --split)")
    p.add_argument("--data", help="split mode: preprocessed .h5ad holding the control cells of the split")
    p.add_argument("--split", help="split mode: split JSON (default: the split saved with the run)")
    p.add_argument("--subset", choices=["test", "val", "train"], help="split mode: which conditions (default test)")
    own = p.add_argument_group("your own control cells (instead of --data)")
    own.add_argument("--controls", metavar="MY.h5ad", help="your control cells (any context, also unseen ones)")
    own.add_argument("--perturbations", metavar="P1,P2|@FILE",
                     help="perturbations to predict (A+B for combinations), comma-separated or @file, one a line")
    own.add_argument("--context-keys", metavar="COL[,COL]",
                     help="your obs column(s) holding the context, in the order of the run's context columns")
    own.add_argument("--input-kind", choices=["counts", "log1p"], help="what X of --controls holds; never guessed")
    own.add_argument("--pseudobulk", action="store_true",
                     help="write one mean row per (context, perturbation, sample) instead of cells")
    p.add_argument("--doses", metavar="D1,D2",
                   help="doses to predict at (runs trained with a dose key): known ones, or any number when the run "
                        "encodes doses continuously; split mode without it: each condition's measured doses")
    own.add_argument("--batch-key", help="your obs column holding batch values of the run's batch vocabulary")
    own.add_argument("--reference", metavar="TRAIN.h5ad",
                     help="the run's preprocessed training data: the collapse check compares against its shifts")
    p.add_argument("--missing-genes", default="error", choices=["error", "zero"],
                   help="genes of the run absent from --data/--controls (matched by name): error, listing them "
                        "(default), or fill with zeros")
    p.add_argument("--unknown-perturbations", default="error", choices=["error", "generic"],
                   help="perturbation parts never seen in training and covered by no prior or embedding table: "
                        "error, naming every such condition (default), or predict them as the generic perturbation "
                        "token")
    p.add_argument("--from-dataset", metavar="NAME",
                   help="zero-shot: pretraining data set whose output layer to use (default: most shared genes)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of the run")
    p.add_argument("--n-cells", type=int,
                   help="cells per condition (default: as many as the real condition, or as the context's controls)")
    p.add_argument("--n-samples", type=int, default=1, help="independent response distributions per condition")
    p.add_argument("--guidance", type=float, help="guidance weight w: (1 + w)·cond − w·uncond, >= -1 (default: the "
                   "run's, the one its validation chose where it trained with train.val_guidance)")
    p.add_argument("--steps", type=int, help="sampler steps: DDIM's for --start full, the flow solver's (default: "
                                             "the run's)")
    p.add_argument("--start", choices=["full", "truncated"], help="VP sampler start (default: the run's)")
    p.add_argument("--solver", choices=["euler", "heun", "dopri5", "rk4"],
                   help="ODE solver of a flow-matching run (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-controls", action="store_true", help="write predicted cells only (no real control cells)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    threads_argument(p)
    deb = p.add_argument_group("prediction-powered debiasing (split mode)")
    deb.add_argument("--debias", action="store_true",
                     help="also write conditions x genes pseudobulks corrected by the model's error on the split's "
                          "validation conditions (measured, held out of training; at least 2), with prediction "
                          "intervals and DE calls: OUT with .debiased.h5ad for .h5ad")
    deb.add_argument("--level", type=float, default=0.9, help="--debias: interval level (default 0.9)")
    deb.add_argument("--fdr", type=float, default=0.05, help="--debias: false discovery rate of DE calls (0.05)")
    deb.add_argument("--min-effect", type=float, default=0.05,
                     help="--debias: the response (log1p) a DE call must exceed (default 0.05, chosen on validation)")
    p.add_argument("--out", required=True, help="output .h5ad (log1p, the layout cell-eval reads)")


def _given(args: argparse.Namespace, names) -> list[str]:
    defaults = {"missing_genes": "error", "pseudobulk": False, "debias": False}
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, defaults.get(n))]


def check_mode(args: argparse.Namespace) -> str:
    """'data' or 'controls'; the two modes exclude each other (ConfigError naming the offending flags)."""
    for flag, value in (("--n-samples", args.n_samples), ("--n-cells", args.n_cells), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.data and args.controls:
        raise ConfigError("--data (a split's conditions) and --controls (your own control cells) exclude each "
                          "other: pass one")
    if not args.data and not args.controls:
        raise ConfigError("pass --data DATA.h5ad (predict a split's conditions) or --controls MY.h5ad (predict for "
                          "your own control cells)")
    wrong = _given(args, CONTROLS_ONLY) if args.data else _given(args, DATA_ONLY)
    if wrong:
        mode = "--data" if args.data else "--controls"
        raise ConfigError(f"{', '.join(wrong)} cannot be used with {mode}")
    for flag, value in (("--level", args.level), ("--fdr", args.fdr)):
        if not 0 < value < 1:
            raise ConfigError(f"{flag} must lie in (0, 1), got {value}")
    if args.min_effect < 0:
        raise ConfigError(f"--min-effect must be at least 0, got {args.min_effect}")
    if args.controls:
        missing = [f for f, v in (("--perturbations", args.perturbations), ("--context-keys", args.context_keys),
                                  ("--input-kind", args.input_kind)) if not v]
        if missing:
            raise ConfigError(f"--controls needs {', '.join(missing)}")
    return "data" if args.data else "controls"


def parse_list(text: str, what: str) -> list[str]:
    """Comma-separated values, or ``@FILE`` with one value a line (blank lines and # comments skipped)."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.exists():
            raise DataError(f"{what} file not found: {path}")
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        items = [v.strip() for ln in lines for v in ln.split(",")]
    else:
        items = [v.strip() for v in text.split(",")]
    items = [v for v in items if v]
    if not items:
        raise DataError(f"{what} lists nothing: {text!r}")
    return items


def run(args: argparse.Namespace) -> int:
    from perturbdiff._io import atomic_write

    bulk = None
    if check_mode(args) == "controls":
        pred = _predict_controls(args)
    else:
        pred, bulk = _predict_split(args)
    atomic_write(args.out, pred.write_h5ad)
    n_pred = int(pred.obs["predicted"].sum())
    unit = "pseudobulk rows" if "n_cells" in pred.obs else "cells"
    print(f"wrote {args.out}: {n_pred} predicted {unit}, {pred.n_obs - n_pred} control {unit}, {pred.n_vars} genes")
    if bulk is not None:
        path = debiased_path(args.out)
        atomic_write(path, bulk.write_h5ad)
        info = bulk.uns["debias"]
        print(f"wrote {path}: {bulk.n_obs} debiased conditions (lambda {info['lam']:.2f}, {info['n_related']} related "
              f"held-out conditions), DE genes called at FDR {args.fdr:g}: "
              + ", ".join(f"{name} {int(n)}" for name, n in bulk.obs["n_de"].items()))
    return 0


def debiased_path(out: str | Path) -> Path:
    """Where ``--debias`` writes: OUT with ``.debiased.h5ad`` in place of ``.h5ad``."""
    out = Path(out)
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.name
    return out.with_name(f"{stem}.debiased.h5ad")


def _predict_split(args: argparse.Namespace):
    from perturbdiff.data import Split
    from perturbdiff.datasets import read_h5ad
    from perturbdiff.model import PerturbDiff, is_pretrained_run

    adata = read_h5ad(args.data)
    if is_pretrained_run(args.run, args.checkpoint):
        if args.debias:
            raise ConfigError("--debias needs a task run (train or finetune): a pretraining run has no held-out "
                              "conditions to measure its error on")
        return _zero_shot(args, adata), None
    if args.from_dataset:
        raise ConfigError("--from-dataset applies to zero-shot prediction with a `perturbdiff pretrain` run only")
    model = PerturbDiff.load(args.run, adata=adata, which=args.checkpoint)
    if args.split:
        model.split = Split.read(args.split)
    if args.debias:  # every problem with the related conditions named before any generation (reads obs only)
        from perturbdiff.model import check_related

        if model.split is None:
            raise ConfigError("--debias needs a split (--split, or the one saved with the run)")
        check_related(model, None, model.split.subset(args.subset or "test"), adata)
    pred = model.predict(subset=args.subset or "test", n_cells=args.n_cells, n_samples=args.n_samples,
                         guidance=args.guidance, steps=args.steps, start=args.start, solver=args.solver,
                         seed=args.seed, include_controls=not args.no_controls, progress=not args.no_progress,
                         device=args.device, doses=parse_list(args.doses, "--doses") if args.doses else None,
                         missing_genes=args.missing_genes, unknown_perturbations=args.unknown_perturbations)
    bulk = (model.debias(pred, level=args.level, fdr=args.fdr, min_effect=args.min_effect,
                         progress=not args.no_progress, device=args.device) if args.debias else None)
    return pred, bulk


def _zero_shot(args: argparse.Namespace, adata):
    """A pretrained run: cells of each condition's context from the marginal, no labels and no controls used."""
    from perturbdiff.data import Split
    from perturbdiff.model import Pretrained

    if not args.split:
        raise ConfigError("zero-shot prediction with a pretraining run needs --split (which conditions to predict)")
    if args.guidance:
        raise ConfigError("--guidance does not apply to zero-shot prediction (no perturbation to guide towards)")
    pre = Pretrained.load(args.run, which=args.checkpoint)
    return pre.zero_shot(adata, split=Split.read(args.split), subset=args.subset or "test", n_cells=args.n_cells,
                         dataset=args.from_dataset, n_samples=args.n_samples, steps=args.steps, start=args.start,
                         solver=args.solver, seed=args.seed, include_controls=not args.no_controls,
                         progress=not args.no_progress,
                         device=args.device)


def _predict_controls(args: argparse.Namespace):
    from perturbdiff.datasets import read_h5ad
    from perturbdiff.model import PerturbDiff, is_pretrained_run

    if is_pretrained_run(args.run, args.checkpoint):
        raise ConfigError(f"{args.run} is a pretraining run: it predicts zero-shot for a split (--data, --split); "
                          "finetune it to predict perturbations for your own control cells")
    model = PerturbDiff.load(args.run, which=args.checkpoint)
    perts = parse_list(args.perturbations, "--perturbations")
    model.vocab.encode_pert(perts, args.unknown_perturbations)  # unknown ones: refused before reading any cells
    controls = read_h5ad(args.controls)
    reference = read_h5ad(args.reference) if args.reference else None
    pred = model.predict_for_controls(
        controls, perts, context_keys=parse_list(args.context_keys, "--context-keys"), input_kind=args.input_kind,
        missing_genes=args.missing_genes, n_cells=args.n_cells, n_samples=args.n_samples,
        pseudobulk=args.pseudobulk, seed=args.seed, guidance=args.guidance, steps=args.steps, start=args.start,
        solver=args.solver, progress=not args.no_progress, device=args.device,
        doses=parse_list(args.doses, "--doses") if args.doses else None, batch_key=args.batch_key,
        reference=reference, unknown_perturbations=args.unknown_perturbations)
    return pred[pred.obs["predicted"].to_numpy(bool)].copy() if args.no_controls else pred
