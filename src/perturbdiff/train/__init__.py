"""Training: optimiser and LR schedule, EMA, checkpoints, the loop, data-parallel runs under torchrun."""

from perturbdiff.train._checkpoint import load_checkpoint, save_checkpoint, split_prefix
from perturbdiff.train._distributed import DistInfo, barrier, cleanup, is_main, setup_distributed
from perturbdiff.train._ema import EMA
from perturbdiff.train._loop import Trainer, TrainState, selection_score
from perturbdiff.train._optim import lr_factor, make_optimizer
from perturbdiff.train._run import check_resumable, resume_point, run_trainer

__all__ = [
    "EMA",
    "Trainer",
    "TrainState",
    "selection_score",
    "load_checkpoint",
    "save_checkpoint",
    "split_prefix",
    "run_trainer",
    "check_resumable",
    "resume_point",
    "lr_factor",
    "make_optimizer",
    "DistInfo",
    "setup_distributed",
    "is_main",
    "barrier",
    "cleanup",
]
