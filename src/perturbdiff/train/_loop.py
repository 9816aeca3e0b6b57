"""The training loop: fixed step budget, EMA, validation every N steps, best + last checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from perturbdiff._logging import logger
from perturbdiff._threads import auto_active, calibrate
from perturbdiff.config import Config
from perturbdiff.data import SetLoader
from perturbdiff.train._checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    split_prefix,
)
from perturbdiff.train._distributed import (
    GradSynced,
    from_main,
    mean_over_ranks,
    setup_distributed,
    step_seeds,
    wrap_ddp,
)
from perturbdiff.train._ema import EMA
from perturbdiff.train._optim import make_optimizer, set_lr

LOG_FIELDS = ["step", "epoch", "lr", "loss", "mse", "ed", "mean", "grad_norm", "cells_per_s", "val_score", "val_ed",
              "val_pearson_delta", "val_guidance"]


def selection_score(scores: dict, rule: str) -> float:
    """The number that picks the best checkpoint (lower is better) from a validator's scores: ``ed`` its
    ``val_score``; ``ed_pearson`` ED × (1 − pearson_delta), so a checkpoint that moves the populations no further but
    gets the mean response more right wins (ED alone where pearson_delta is undefined)."""
    r = scores.get("val_pearson_delta", math.nan)
    if rule == "ed_pearson" and "val_ed" in scores and math.isfinite(r):
        return scores["val_ed"] * (1.0 - r)
    return scores.get("val_score", math.inf)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    sets_in_epoch: int = 0  # sets of the epoch's (global) order consumed so far, by all ranks together
    best_score: float = math.inf  # lower is better
    best_step: int = -1
    world_size: int = 1  # processes of the run that wrote the checkpoint
    threads: int = 0  # CPU threads training ran with after this checkpoint (0: not recorded)


class Trainer:
    """Owns the optimiser, EMA and loss generator; the network, the process (its ``loss``) and the loader are given.

    Under torchrun (WORLD_SIZE > 1) it joins the process group, wraps the network in DDP and reads this rank's
    share of every global batch; rank 0 alone validates, logs and writes checkpoints (docs/DISTRIBUTED.md).
    """

    def __init__(self, network: nn.Module, process, dataset, cfg: Config, *, meta: Callable[[], dict],
                 validate: Callable[[nn.Module], dict] | None = None, out_dir: str | Path | None = None,
                 device: str | torch.device | None = "cpu", extra_tensors: Callable[[], dict] | None = None):
        self.net, self.process, self.cfg, self.meta = network, process, cfg, meta
        self.extra_tensors = extra_tensors or dict  # fixed tensors every checkpoint carries (a codec's weights)
        self.dist, self.device = setup_distributed(device)  # one plain process unless under torchrun
        self.loader = SetLoader(dataset, cfg.data.batch_sets, num_workers=cfg.data.num_workers,
                                pin_memory=self.device.type == "cuda", rank=self.dist.rank,
                                world_size=self.dist.world_size, seed=cfg.train.seed)
        self.validate = validate
        self.out_dir = Path(out_dir) if out_dir else None
        self.net.to(self.device)
        self.opt = make_optimizer(self.net, cfg.train)
        self.ema = EMA(self.net, cfg.train.ema_decay, cfg.train.ema_every, cfg.train.ema_warmup)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        self.state = TrainState()
        self.forward_net = torch.compile(self.net) if cfg.train.compile else self.net  # shares self.net's weights
        self.ddp: DistributedDataParallel | None = None  # set while fit() runs under several processes
        self.loss_net: Callable = self.forward_net
        self._last_batch: dict | None = None  # the latest training batch: what --threads auto times at checkpoints

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
            loss, parts = self.process.loss(self.loss_net, batch, generator=self.gen)
        (loss / self.cfg.train.grad_accum).backward()
        return parts

    def _seed_step(self) -> None:
        """Noise streams derived from (seed, rank, step), so a run resumes exactly without saving generator states
        (the CUDA generator's included, which label dropout draws from on a GPU), on any number of ranks."""
        a, b = step_seeds(self.cfg.train.seed, self.dist.rank, self.state.step)
        self.gen.manual_seed(a)
        torch.manual_seed(b)  # covariate dropout draws from the global RNG (CPU and CUDA)

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimiser step (``grad_accum`` micro-batches, DDP all-reduce on the last only); averaged loss parts."""
        self.net.train()
        if self.dist.enabled and self.ddp is None:
            raise RuntimeError("under several processes train_step runs inside fit() (gradients sync via DDP)")
        self._seed_step()  # every step's draws (CPU and CUDA) follow from (seed, rank, step): resume is exact anywhere
        lr = set_lr(self.opt, self.state.step, self.cfg.train)
        self.opt.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        n_cells, n_micro = 0, self.cfg.train.grad_accum
        for i in range(n_micro):
            batch = self._last_batch = next(batches)
            self.state.epoch, self.state.sets_in_epoch = self.loader.epoch, self.loader.sets_in_epoch
            n_cells += batch["target"].shape[0] * batch["target"].shape[1] * self.dist.world_size
            no_sync = self.ddp is not None and i < n_micro - 1
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                parts = self._loss_and_backward(batch)
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + float(v) / n_micro
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.state.step += 1
        self.ema.update(self.net, self.state.step)
        return {**acc, "lr": lr, "grad_norm": float(gn), "n_cells": n_cells}

    # -- the loop --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _data_parallel(self) -> Iterator[None]:
        """DDP around the network while fit() runs, released after it: a Reducer that outlives the process
        group would tear the group down under the GIL and can deadlock gloo's worker threads at exit."""
        if not self.dist.enabled:
            yield
            return
        self.ddp = wrap_ddp(self.forward_net, self.device)  # broadcasts rank 0's weights to all ranks
        self.loss_net = GradSynced(self.ddp, self.forward_net)
        try:
            yield
        finally:
            self.ddp, self.loss_net = None, self.forward_net
            gc.collect()

    def fit(self, max_steps: int | None = None, progress: bool = True) -> TrainState:
        """Train until ``max_steps`` (default: the config's budget); saves last/best under ``out_dir``.

        A ``max_steps`` other than the config's becomes the run's budget: the learning-rate schedule ends there.
        """
        if max_steps and max_steps != self.cfg.train.max_steps:
            self.cfg = self.cfg.update({"train": {"max_steps": int(max_steps)}})
        self.state.world_size = self.dist.world_size
        with self._data_parallel():
            return self._loop(max_steps or self.cfg.train.max_steps, progress)

    def _auto_threads(self) -> bool:
        """``--threads auto`` applies: CPU work in one process (under torchrun each rank keeps torch's count)."""
        return auto_active(self.device) and not self.dist.enabled

    def _measure_threads(self, batch: dict) -> None:
        """``--threads auto``: time this batch's forward + backward at each thread count and keep the best. Leaves
        no trace in the run (gradients dropped, generators restored; the next step re-seeds them anyway)."""
        state = self.gen.get_state()

        def work():
            with torch.random.fork_rng(devices=[]):
                self._loss_and_backward(batch)
            self.opt.zero_grad(set_to_none=True)

        self.net.train()
        calibrate(work, "training step")
        self.gen.set_state(state)

    def _start_threads(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The thread count a run starts with under ``auto``: the checkpoint's when resuming (so the rest of the run
        is what an unbroken one computes), else measured on the first batch (which training then takes as usual)."""
        if not self._auto_threads():
            return batches
        if self.state.step > 0 and self.state.threads > 0:
            torch.set_num_threads(self.state.threads)
            logger.info("threads: %d (auto, as the run had at step %d)", self.state.threads, self.state.step)
            return batches
        first = next(batches)
        self._measure_threads(first)
        return itertools.chain([first], batches)

    def _loop(self, max_steps: int, progress: bool) -> TrainState:
        batches = self.loader.stream()
        if self.state.step < max_steps:
            batches = self._start_threads(batches)
        log = self._open_log()
        bar = tqdm(total=max_steps, initial=self.state.step, disable=not (progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        t0, cells = time.perf_counter(), 0
        try:
            while self.state.step < max_steps:
                parts = self.train_step(batches)
                cells += parts.pop("n_cells")
                bar.update(1)
                row = None
                if self.state.step % self.cfg.train.log_every == 0 or self.state.step == max_steps:
                    parts = mean_over_ranks(parts, self.device)
                    dt = time.perf_counter() - t0
                    row = {**parts, "step": self.state.step, "epoch": self.state.epoch,
                           "cells_per_s": cells / max(dt, 1e-9)}
                    t0, cells = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", ed=f"{parts.get('ed', 0):.3f}")
                if self.state.step % self.cfg.train.val_every == 0 or self.state.step == max_steps:
                    scores = self._validate() if self.dist.is_main else {}
                    row = {**(row or {"step": self.state.step, "epoch": self.state.epoch}), **scores}
                    if self.state.step < max_steps and self._auto_threads():
                        self._measure_threads(self._last_batch)  # a load that came since is caught here
                    self.save("last")
                    self._share_best()
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

    def _share_best(self) -> None:
        """Every rank takes rank 0's best score and step (the others wait here while rank 0 validates and saves)."""
        if self.dist.enabled:
            score, step = from_main([self.state.best_score, float(self.state.best_step)], self.device)
            self.state.best_score, self.state.best_step = score, int(step)

    def _validate(self) -> dict:
        """Score the EMA weights; keep the best checkpoint (lower score is better)."""
        if self.validate is None:
            self.save("best")
            return {}
        scores = self.validate(self.ema.module)
        score = scores["val_score"] = selection_score(scores, self.cfg.train.val_select)  # the log shows it
        if score < self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.state.step
            if self.out_dir is None:  # no best.safetensors to read back: keep the weights themselves
                self._best_ema = {k: v.detach().clone() for k, v in self.ema.state_dict().items()}
            self.save("best")
        logger.debug("step %d validation %s", self.state.step, scores)
        return scores

    def best_weights(self) -> dict[str, torch.Tensor]:
        """The EMA weights of the best validation checkpoint (what ``predict`` on the run directory loads): from
        ``best.safetensors`` when the run writes files, else the copy kept when it was chosen, else the EMA now."""
        path = self.checkpoint_path("best")
        if path is not None and path.exists():
            return split_prefix(load_checkpoint(path, prefixes=("ema.",))[0], "ema")
        return getattr(self, "_best_ema", None) or self.ema.state_dict()

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path | None:
        return self.out_dir / f"{name}.safetensors" if self.out_dir else None

    def save(self, name: str) -> Path | None:
        """Write ``name``.safetensors under ``out_dir`` (rank 0 only: the weights are the same on every rank)."""
        path = self.checkpoint_path(name)
        if path is None or not self.dist.is_main:
            return None
        opt_tensors, opt_info = optimizer_to_flat(self.opt)
        tensors = {**{f"model.{k}": v for k, v in self.net.state_dict().items()},
                   **{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **opt_tensors, "rng.loss": self.gen.get_state(), "rng.torch": torch.get_rng_state(),
                   **self.extra_tensors()}
        self.state.threads = torch.get_num_threads()
        meta = {**self.meta(), "state": asdict(self.state), "optimizer": opt_info}
        return save_checkpoint(path, tensors, meta)

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser, RNG and data position (the next step equals an unbroken run's).

        Every rank reads the same file. The position counts sets of the epoch's global order, so a run resumed
        with another number of processes continues at the same set; several ranks re-derive their RNG per step.
        """
        tensors, meta = load_checkpoint(path)
        self.net.load_state_dict(split_prefix(tensors, "model"))
        self.ema.load_state_dict(split_prefix(tensors, "ema"))
        optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        self.gen.set_state(tensors["rng.loss"])
        torch.set_rng_state(tensors["rng.torch"])
        state = dict(meta["state"])
        if "batch_in_epoch" in state:  # checkpoints before distributed training counted batches of B sets
            state["sets_in_epoch"] = state.pop("batch_in_epoch") * self.cfg.data.batch_sets
        self.state = TrainState(**state)
        self.loader.seek(self.state.epoch, self.state.sets_in_epoch)
        logger.info("resumed from %s at step %d (epoch %d, set %d; written by %d process(es), now %d)", path,
                    self.state.step, self.state.epoch, self.state.sets_in_epoch, self.state.world_size,
                    self.dist.world_size)

    def _open_log(self):
        if self.out_dir is None or not self.dist.is_main:
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
