"""Data-parallel training: 2 CPU processes (gloo) hold identical weights, share each epoch without overlap, and a
run resumed with another number of processes continues at the same set of the epoch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import perturbdiff
from perturbdiff import Config, DataError, PerturbDiff
from perturbdiff.data import CellSetDataset, CellSetIndex, make_split, shard_batches
from perturbdiff.train import Trainer, load_checkpoint

B, ACCUM, K = 2, 2, 2  # sets per rank and micro-batch, micro-batches per step, steps before the checkpoint
START = "fork" if sys.platform == "linux" else "spawn"  # fork: the ranks inherit imports and data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recording(torch.utils.data.Dataset):
    """A CellSetDataset that records (epoch, set indices) of every batch it serves."""

    def __init__(self, ds: CellSetDataset):
        self.ds, self.seen = ds, []

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, idx):
        self.seen.append((self.ds.epoch, [int(i) for i in idx]))
        return self.ds.__getitems__(idx)


def _config(set_size: int) -> Config:
    cfg = Config.from_preset("tiny").update({
        "model": {"hidden": 16, "depth": 1, "heads": 2, "cov_dim": 8},
        "data": {"set_size": set_size, "batch_sets": B, "control_set_fraction": 0.25},
    })
    return cfg.update({"train": {"max_steps": 100, "val_every": K, "log_every": 1, "warmup_steps": 2,
                                 "grad_accum": ACCUM, "ema_every": 1}})


def _trainer(prep, split, cfg: Config, out: Path | None) -> tuple[Trainer, Recording]:
    model = PerturbDiff.from_config(cfg, prep, split)
    index = CellSetIndex.build(prep, model.keys, split.train)
    ds = Recording(CellSetDataset(prep, index, model.vocab, set_size=cfg.data.set_size, seed=cfg.train.seed,
                                  control_set_fraction=cfg.data.control_set_fraction, codec=model.codec))
    return Trainer(model.network, model.process, ds, cfg, meta=model._meta, out_dir=out, device="cpu"), ds


def _worker(rank: int, port: int, prep, split, cfg: Config, out: Path, total: int) -> None:
    """One of 2 ranks: K steps (checkpoint copied to at_k), then on to ``total`` steps; writes what it holds.

    Then a second trainer resumes from at_k with the same 2 ranks and runs to ``total`` as well.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer, ds = _trainer(prep, split, cfg, out)
    assert trainer.dist.world_size == 2 and trainer.ddp is None  # DDP exists while fit() runs
    trainer.fit(K, progress=False)
    mark = len(ds.seen)
    if rank == 0:
        shutil.copy(out / "last.safetensors", out / "at_k.safetensors")
    trainer.fit(total, progress=False)
    weights = {**{f"model.{k}": v for k, v in trainer.net.state_dict().items()},
               **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in weights.items()}, out / f"rank{rank}.safetensors")
    again, _ = _trainer(prep, split, cfg, None)
    again.resume(out / "at_k.safetensors")
    again.fit(total, progress=False)
    exact = all(torch.equal(v, weights[f"model.{k}"]) for k, v in again.net.state_dict().items())
    noise = trainer.gen.get_state().tolist()  # the loss generator's state: each rank draws its own noise
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": ds.seen, "mark": mark, "resume_exact": exact,
                                                      "noise": noise}))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def setup(synthetic_prep, synthetic_keys):
    """Data, a split and a set size S that gives an even number of sets per epoch (so W = 2 skips none)."""
    prep = synthetic_prep.copy()
    split = make_split(prep, synthetic_keys, "held-out-perturbations", seed=0)
    for S in range(16, 32):
        cfg = _config(S)
        model = PerturbDiff.from_config(cfg, prep, split)
        index = CellSetIndex.build(prep, model.keys, split.train)
        n = len(CellSetDataset(prep, index, model.vocab, set_size=S, seed=0, control_set_fraction=0.25))
        if n % 2 == 0:
            return prep, split, cfg, n
    raise AssertionError("no set size gives an even number of sets")


@pytest.fixture(scope="module")
def two_ranks(setup, tmp_path_factory):
    """Run 2 gloo processes for one epoch and a step more; return their records and weights."""
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: once here, inherited by the forked ranks)

    prep, split, cfg, n = setup
    out = tmp_path_factory.mktemp("ddp")
    total = -(-n // (2 * B * ACCUM)) + 1
    mp.start_processes(_worker, args=(_free_port(), prep, split, cfg, out, total), nprocs=2, start_method=START)
    runs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    return out, runs, weights, total


def test_two_ranks_hold_identical_weights_and_share_the_epoch(setup, two_ranks):
    _, _, _, n = setup
    out, runs, weights, total = two_ranks
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k  # bit-identical after every synchronised step
    first = load_checkpoint(out / "at_k.safetensors")[0]
    assert not torch.equal(first["model.x_in.weight"], weights[0]["model.x_in.weight"])  # training went on
    per_rank = [[i for e, idx in run["seen"] if e == 0 for i in idx] for run in runs]
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2  # equal shares
    assert not set(per_rank[0]) & set(per_rank[1])
    both = per_rank[0] + per_rank[1]
    assert sorted(both) == list(range(n))  # together: every set of the epoch exactly once
    assert runs[0]["resume_exact"] and runs[1]["resume_exact"]  # 2 ranks resumed at step K: the same weights
    assert runs[0]["noise"] != runs[1]["noise"]
    assert any(e == 1 for e, _ in runs[0]["seen"])  # the last step ran into the next epoch
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta["state"]["step"] == total and meta["state"]["world_size"] == 2
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == total + 1  # one header, one row per step: rank 0 alone writes it


def test_resume_with_one_process_continues_the_epoch_where_two_left_it(setup, two_ranks, monkeypatch):
    prep, split, cfg, n = setup
    out, runs, _, _ = two_ranks
    _, meta = load_checkpoint(out / "at_k.safetensors")
    assert meta["state"]["sets_in_epoch"] == K * ACCUM * 2 * B and meta["state"]["epoch"] == 0
    before = [i for run in runs for e, idx in run["seen"][: run["mark"]] if e == 0 for i in idx]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    resumed_dir = out / "resumed"
    resumed_dir.mkdir()
    shutil.copy(out / "at_k.safetensors", resumed_dir / "last.safetensors")
    trainer, ds = _trainer(prep, split, cfg, resumed_dir)
    trainer.resume(resumed_dir / "last.safetensors")
    assert trainer.ddp is None and trainer.state.step == K
    steps = -(-(n - len(before)) // (B * ACCUM))
    trainer.fit(K + steps, progress=False)
    after = [i for e, idx in ds.seen if e == 0 for i in idx]
    assert len(before) == K * ACCUM * 2 * B
    assert sorted(before + after) == list(range(n))  # no set repeated, none skipped
    assert trainer.state.epoch == 1


@pytest.mark.parametrize("n,start,W,B_", [(37, 0, 2, 4), (37, 5, 3, 2), (40, 0, 4, 3), (3, 0, 4, 2), (10, 10, 2, 2)])
def test_shard_batches_rule(n, start, W, B_):
    plans = [shard_batches(n, start, B_, rank=r, world_size=W) for r in range(W)]
    assert len({len(p) for p in plans}) == 1  # every rank runs the same number of micro-batches
    for j in range(len(plans[0])):
        sizes = {len(p[j][0]) for p in plans}
        assert len(sizes) == 1 and plans[0][j][1] == W * sizes.pop()  # equal shares; the global size adds up
    seen = [i for p in plans for idx, _ in p for i in idx]
    assert sorted(seen) == list(range(start, n - (n - start) % W))  # disjoint; only (n − start) mod W skipped


def test_world_size_changes_at_step_boundaries_keep_each_set_once():
    n, B_, pos, seen = 103, 3, 0, []
    for W in (4, 2, 2, 3, 1, 5):  # one global micro-batch per world size, then the next resumes at `pos`
        plans = [shard_batches(n, pos, B_, rank=r, world_size=W)[:1] for r in range(W)]
        seen += [i for p in plans for idx, _ in p for i in idx]
        pos += plans[0][0][1]
    rest = [shard_batches(n, pos, B_, rank=r, world_size=2) for r in range(2)]
    seen += [i for p in rest for idx, _ in p for i in idx]
    assert len(seen) == len(set(seen)) and set(seen) == set(range(n - (n - pos) % 2))


def test_too_few_sets_for_the_processes_is_an_error_not_a_hang(setup):
    prep, split, cfg, _ = setup
    trainer, ds = _trainer(prep, split, cfg, None)
    trainer.loader.dataset = torch.utils.data.Subset(ds, [])  # an epoch of no sets
    trainer.loader.dataset.set_epoch = ds.set_epoch
    with pytest.raises(DataError, match="0 sets"):
        trainer.fit(1, progress=False)


@pytest.mark.slow
def test_torchrun_cli_trains_with_two_processes(setup, tmp_path):
    """The documented launch: ``torchrun --nproc_per_node=2 -m perturbdiff.cli train ...`` on CPU (gloo)."""
    prep, split, _, _ = setup
    prep.write_h5ad(tmp_path / "prep.h5ad")
    split.write(tmp_path / "split.json")
    env = {**os.environ, "PYTHONPATH": str(Path(perturbdiff.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "perturbdiff.cli", "train", str(tmp_path / "prep.h5ad"), "--split", str(tmp_path / "split.json"),
           "--preset", "tiny", "--set", "model.hidden=16", "--set", "model.depth=1", "--set", "model.heads=2",
           "--set", "data.set_size=8", "--set", "train.val_every=2", "--max-steps", "4", "--device", "cpu",
           "--no-progress", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
    _, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["state"]["world_size"] == 2 and meta["state"]["step"] == 4
    assert np.isfinite(float(open(tmp_path / "run" / "log.csv").read().splitlines()[-1].split(",")[3]))
