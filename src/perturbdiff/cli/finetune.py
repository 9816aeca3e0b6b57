"""``perturbdiff finetune``: train on a perturbation task starting from a ``perturbdiff pretrain`` run."""

from __future__ import annotations

import argparse
from pathlib import Path

from perturbdiff.cli.train import add_config_arguments, best_note, resolve_config, speak_on_rank0, train_in_group


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrained", metavar="PRETRAINED_RUN",
                   help="run directory (or checkpoint) of `perturbdiff pretrain`")
    p.add_argument("data", help="preprocessed .h5ad of the task (output of `perturbdiff preprocess`)")
    p.add_argument("--split", required=True, help="split JSON of the task")
    p.add_argument("--io-layers", default="keep", choices=["keep", "reinit", "task"],
                   help="input/output layers: keep the pretrained vocabulary-wide ones (task genes mapped into the "
                        "vocabulary), reinit them, or new layers for the task's own genes (default keep)")
    p.add_argument("--from-dataset", metavar="NAME",
                   help="pretraining data set whose input/output layers to keep (default: most shared genes)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which pretraining checkpoint")
    p.add_argument("--fraction", type=float, help="keep this fraction of perturbed training cells per condition")
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.csv, config.toml, split.json")


def run(args: argparse.Namespace) -> int:
    from perturbdiff._logging import logger
    from perturbdiff.data import Split
    from perturbdiff.datasets import read_h5ad
    from perturbdiff.model import Pretrained, finetune

    speak_on_rank0()
    pre = Pretrained.load(args.pretrained, which=args.checkpoint)
    if args.preset is None and args.config is None:
        args.preset = pre.cfg.preset  # the pretrained run's size preset; its architecture is kept in any case
    cfg = resolve_config(args)
    adata = read_h5ad(args.data)
    split = Split.read(args.split)
    model = finetune(pre, cfg, adata, split, io_layers=args.io_layers, dataset=args.from_dataset)
    out = Path(args.out)
    logger.info("finetuning (io layers %s) %d steps, run directory %s", args.io_layers, model.cfg.train.max_steps, out)
    if train_in_group(lambda: model.train(out_dir=out, progress=not args.no_progress, resume=not args.no_resume,
                                          device=args.device)):
        state = model.trainer.state
        print(f"finetuned {state.step} steps from {args.pretrained}; checkpoints in {out} {best_note(state)}".rstrip())
    return 0
