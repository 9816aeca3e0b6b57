"""``perturbdiff train``: train PerturbDiff on a preprocessed AnnData and a split."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from perturbdiff._config_rules import CODEC_KINDS
from perturbdiff._logging import logger
from perturbdiff.cli import threads_argument
from perturbdiff.config import DEFAULT_PRESET, PRESETS, Config

CHECKPOINTS_HELP = """checkpoints:
  OUT/last.safetensors is written every train.val_every steps, at the end and on Ctrl-C; OUT/best.safetensors
  whenever the validation energy distance improves (predict uses best). Weights, EMA, optimiser, random state and
  data position are all in them.

resuming:
  automatic: run the same command again and training continues exactly where OUT's last checkpoint left it (a
  larger --max-steps trains further). A different config, split or gene set is refused before anything is
  written; --no-resume starts afresh in OUT."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = CHECKPOINTS_HELP
    p.add_argument("data", help="preprocessed .h5ad (output of `perturbdiff preprocess`)")
    p.add_argument("--split", required=True, help="split JSON (output of `perturbdiff split` or a benchmark split)")
    p.add_argument("--fraction", type=float, help="keep this fraction of perturbed training cells per condition")
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.csv, config.toml, split.json")


def add_config_arguments(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    """The flags every training command shares (train, pretrain, finetune; ``config`` takes the first six)."""
    p.add_argument("--config", help="TOML file with any hyper-parameters (sections data/model/diffusion/train)")
    p.add_argument("--preset", choices=list(PRESETS), help="model size preset (default: tiny, or the config's)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides the config)")
    p.add_argument("--seed", type=int, help="random seed (overrides the config)")
    p.add_argument("--codec", choices=CODEC_KINDS,
                   help="model space: scale (every gene, the default) or latent (an autoencoder fitted on the training "
                        "cells first; cost stops growing with the number of genes; codec.latent_* keys set it up)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set diffusion.ed_weight=0.5 (repeatable); "
                        "`perturbdiff config --keys` lists every key, `perturbdiff config --preset small` the values")
    if not training:
        return
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; under torchrun cuda "
                   "means cuda:LOCAL_RANK, see docs/DISTRIBUTED.md)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if OUT holds a run (by default a run in OUT is resumed at its last "
                        "checkpoint, exactly, when its config, split and genes are the same; refused otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    threads_argument(p)


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset, then the TOML file, then flags: later ones win."""
    import tomllib

    file_values: dict = {}
    if args.config:
        Config.from_toml(args.config)  # validates with a clear message
        with open(args.config, "rb") as fh:
            file_values = tomllib.load(fh)
    preset = args.preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    cfg = Config.from_preset(preset).update(file_values)
    flags = {"train.max_steps": args.max_steps, "train.seed": args.seed, "codec.kind": getattr(args, "codec", None),
             "data.fraction": getattr(args, "fraction", None)}
    cfg = cfg.update({k: v for k, v in flags.items() if v is not None})
    cfg = cfg.with_items(args.set or [])
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    from perturbdiff.data import Split
    from perturbdiff.datasets import read_h5ad
    from perturbdiff.model import PerturbDiff

    speak_on_rank0()
    cfg = resolve_config(args)
    adata = read_h5ad(args.data)
    split = Split.read(args.split)
    model = PerturbDiff.from_config(cfg, adata, split)
    out = Path(args.out)
    logger.info("preset %s, %d steps, run directory %s", cfg.preset, cfg.train.max_steps, out)
    if train_in_group(lambda: model.train(out_dir=out, progress=not args.no_progress, resume=not args.no_resume,
                                          device=args.device)):
        print(finished_note(model.trainer, out))
    return 0


def finished_note(trainer, out: Path) -> str:
    """The last line of a training command: what this call did, where the checkpoints are, the best step."""
    state, start = trainer.state, getattr(trainer, "start_step", 0)
    if state.step == start and start > 0:
        did = f"nothing to train: the run had already reached step {state.step}"
    elif start > 0:
        did = f"trained steps {start + 1}-{state.step} (resumed at step {start})"
    else:
        did = f"trained {state.step} steps"
    return f"{did}; checkpoints in {out} {best_note(state)}".rstrip()


def speak_on_rank0() -> None:
    """Under torchrun only rank 0 logs; call before any work (every process runs the whole command)."""
    from perturbdiff.train import is_main

    if not is_main():
        logger.setLevel(max(logger.level, logging.WARNING))


def train_in_group(train) -> bool:
    """Run ``train()`` (under torchrun the Trainer joins the process group), then leave the group; whether this
    process reports (rank 0, or the only process)."""
    from perturbdiff.train import cleanup, is_main

    try:
        train()
    finally:
        cleanup()
    return is_main()


def best_note(state) -> str:
    """The best validation step of a finished run, for its last line ("" without validation)."""
    return f"best step {state.best_step} (val energy distance {state.best_score:.4f})" if state.best_step >= 0 else ""
