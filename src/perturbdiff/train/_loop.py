"""The training loop: fixed step budget, EMA, validation every N steps, best + last checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from perturbdiff._logging import logger
from perturbdiff.config import Config
from perturbdiff.data._sets import collate_sets
from perturbdiff.diffusion import make_schedule, training_loss
from perturbdiff.train._checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    split_prefix,
)
from perturbdiff.train._ema import EMA
from perturbdiff.train._optim import make_optimizer, set_lr

LOG_FIELDS = ["step", "epoch", "lr", "loss", "mse", "ed", "mean", "grad_norm", "cells_per_s", "val_score", "val_ed",
              "val_pearson_delta"]


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float = math.inf  # lower is better
    best_step: int = -1


class Trainer:
    """Owns the optimiser, EMA, loss generator and data position; the network and data set are given."""

    def __init__(self, network: nn.Module, cfg: Config, dataset, *, meta: Callable[[], dict],
                 validate: Callable[[nn.Module], dict] | None = None, out_dir: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        self.net, self.cfg, self.dataset, self.meta = network, cfg, dataset, meta
        self.validate, self.device = validate, torch.device(device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.net.to(self.device)
        self.sched = make_schedule(cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
        self.opt = make_optimizer(self.net, cfg.train)
        self.ema = EMA(self.net, cfg.train.ema_decay, cfg.train.ema_every)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        self.state = TrainState()
        self.forward_net = torch.compile(self.net) if cfg.train.compile else self.net  # shares self.net's weights

    # -- data ------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """Batches from the current data position onwards, epoch after epoch (deterministic from the seed)."""
        B = self.cfg.data.batch_sets
        while True:
            self.dataset.set_epoch(self.state.epoch)
            n_batches = math.ceil(len(self.dataset) / B)
            order = [list(range(i * B, min((i + 1) * B, len(self.dataset))))
                     for i in range(self.state.batch_in_epoch, n_batches)]
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=order, num_workers=self.cfg.data.num_workers,
                collate_fn=collate_sets,
                persistent_workers=False, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.cfg.train.seed))  # keeps the global RNG untouched
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # -- one step --------------------------------------------------------------------------------------
    def _autocast(self):
        use_bf16 = self.cfg.train.precision == "bf16" or (
            self.cfg.train.precision == "auto" and self.device.type == "cuda")
        if use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_and_backward(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            loss, parts = training_loss(self.forward_net, self.sched, batch, self.cfg.diffusion, generator=self.gen)
        (loss / self.cfg.train.grad_accum).backward()
        return parts

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimiser step (``grad_accum`` micro-batches); returns averaged loss parts."""
        self.net.train()
        lr = set_lr(self.opt, self.state.step, self.cfg.train)
        self.opt.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        n_cells = 0
        for _ in range(self.cfg.train.grad_accum):
            batch = next(batches)
            n_cells += batch["target"].shape[0] * batch["target"].shape[1]
            for k, v in self._loss_and_backward(batch).items():
                acc[k] = acc.get(k, 0.0) + float(v) / self.cfg.train.grad_accum
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.state.step += 1
        self.ema.update(self.net, self.state.step)
        return {**acc, "lr": lr, "grad_norm": float(gn), "n_cells": n_cells}

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None, progress: bool = True) -> TrainState:
        """Train until ``max_steps`` (default: the config's budget); saves last/best under ``out_dir``."""
        max_steps = max_steps or self.cfg.train.max_steps
        batches = self._batches()
        log = self._open_log()
        bar = tqdm(total=max_steps, initial=self.state.step, disable=not progress, desc="train", unit="step",
                   dynamic_ncols=True)
        t0, cells = time.perf_counter(), 0
        try:
            while self.state.step < max_steps:
                parts = self.train_step(batches)
                cells += parts.pop("n_cells")
                bar.update(1)
                row = None
                if self.state.step % self.cfg.train.log_every == 0 or self.state.step == max_steps:
                    dt = time.perf_counter() - t0
                    row = {**parts, "step": self.state.step, "epoch": self.state.epoch,
                           "cells_per_s": cells / max(dt, 1e-9)}
                    t0, cells = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", ed=f"{parts.get('ed', 0):.3f}")
                if self.state.step % self.cfg.train.val_every == 0 or self.state.step == max_steps:
                    row = {**(row or {"step": self.state.step, "epoch": self.state.epoch}), **self._validate()}
                    self.save("last")
                if row is not None and log is not None:
                    log.writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})
        except KeyboardInterrupt:
            logger.info("interrupted at step %d: saving the last checkpoint", self.state.step)
            self.save("last")
            raise
        finally:
            bar.close()
            if log is not None:
                self._log_fh.close()
        return self.state

    def _validate(self) -> dict:
        """Score the EMA weights; keep the best checkpoint (lower score is better)."""
        if self.validate is None:
            self.save("best")
            return {}
        scores = self.validate(self.ema.module)
        score = scores.get("val_score", math.inf)
        if score < self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.save("best")
        logger.debug("step %d validation %s", self.state.step, scores)
        return scores

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path | None:
        return self.out_dir / f"{name}.safetensors" if self.out_dir else None

    def save(self, name: str) -> Path | None:
        path = self.checkpoint_path(name)
        if path is None:
            return None
        opt_tensors, opt_info = optimizer_to_flat(self.opt)
        tensors = {**{f"model.{k}": v for k, v in self.net.state_dict().items()},
                   **{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **opt_tensors, "rng.loss": self.gen.get_state(), "rng.torch": torch.get_rng_state()}
        meta = {**self.meta(), "state": asdict(self.state), "optimizer": opt_info}
        return save_checkpoint(path, tensors, meta)

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser, RNG and data position (the next step equals an unbroken run's)."""
        tensors, meta = load_checkpoint(path)
        self.net.load_state_dict(split_prefix(tensors, "model"))
        self.ema.load_state_dict(split_prefix(tensors, "ema"))
        optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        self.gen.set_state(tensors["rng.loss"])
        torch.set_rng_state(tensors["rng.torch"])
        self.state = TrainState(**meta["state"])
        logger.info("resumed from %s at step %d", path, self.state.step)

    def _open_log(self):
        if self.out_dir is None:
            return None
        path = self.out_dir / "log.csv"
        rows = []
        if path.exists():  # keep rows up to the resumed step so the log matches the checkpoint
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.state.step]
        self._log_fh = open(path, "w", newline="")
        writer = csv.DictWriter(self._log_fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        self._log_fh.flush()
        return _FlushingWriter(writer, self._log_fh)


class _FlushingWriter:
    def __init__(self, writer, fh):
        self.writer, self.fh = writer, fh

    def writerow(self, row):
        self.writer.writerow(row)
        self.fh.flush()


def _fmt(v):
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v
