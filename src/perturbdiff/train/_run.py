"""A run directory: checks before anything is written, config.toml, resuming from the last checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from perturbdiff._errors import ConfigError
from perturbdiff._io import atomic_write_text, check_writable, clean_temp_files
from perturbdiff._logging import logger
from perturbdiff.config import Config, flat_dict
from perturbdiff.train._checkpoint import load_checkpoint
from perturbdiff.train._distributed import is_main
from perturbdiff.train._loop import Trainer

CHECKPOINT_NAMES = ("last.safetensors", "best.safetensors")
#: config keys a resumed run may change: the budget (the schedule is stretched to it from the resumed step on)
RESUMABLE_CHANGES = ("train.max_steps",)


def checkpoint_bytes(network: nn.Module) -> int:
    """Disk a run directory needs: two checkpoints (weights, EMA, two AdamW moments) plus one temp copy."""
    n = sum(p.numel() * p.element_size() for p in network.parameters())
    return 3 * 4 * n + (1 << 20)


def resume_point(out: Path) -> Path | None:
    """``last``; ``best`` when ``last`` was never written completely (its first write killed); else None."""
    for name in CHECKPOINT_NAMES:
        if (out / name).exists():
            if name != CHECKPOINT_NAMES[0]:
                logger.warning("%s has no last checkpoint (its first write was interrupted): resuming from %s",
                               out, name)
            return out / name
    return None


def config_changes(old: dict, new: dict) -> list[str]:
    """``section.key old -> new`` for every config value that differs."""
    a, b = flat_dict(old), flat_dict(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(path: Path, meta: dict) -> dict:
    """Refuse, before anything is written, to resume ``path`` with another config, split, genes or vocabulary
    than the run's (one line naming what differs); returns the checkpoint's metadata."""
    old = load_checkpoint(path, prefixes=("\0",))[1]  # the header only
    run = path.parent
    written = Config.from_checkpoint(old["config"]).to_dict() if "config" in old else {}  # older keys renamed
    changes = [c for c in config_changes(written, meta.get("config", {}))
               if c.split(" ", 1)[0] not in RESUMABLE_CHANGES]

    def part(m: dict, name: str):
        v = (m.get("record") or {}).get("genes") if name == "genes" else m.get(name)
        return None if v is None else _jsonable(v)

    what = [name for name in ("split", "vocab", "genes", "datasets")
            if part(old, name) is not None and part(meta, name) is not None and part(old, name) != part(meta, name)]
    if changes or what:
        shown = "; ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
        parts = ([f"config differs ({shown})"] if changes else []) + [f"its {w} differs" for w in what]
        raise ConfigError(f"{run} holds a run at step {old.get('state', {}).get('step', '?')} that this command "
                          f"cannot continue: {', '.join(parts)}",
                          python="pass resume=False to start afresh there, or choose another out_dir",
                          cli="pass --no-resume to start afresh there, or choose another --out")
    return old


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


def run_trainer(network: nn.Module, process, dataset, cfg: Config, *, meta: Callable[[], dict],
                validate: Callable[[nn.Module], dict] | None, out_dir: str | Path | None, device,
                resume: bool = True, files: dict[str, Callable[[Path], object]] | None = None,
                extra_tensors: Callable[[], dict] | None = None) -> Trainer:
    """A Trainer for a run directory: rank 0 writes config.toml (and ``files``: name -> writer(path)); the run
    continues from ``last.safetensors`` when ``resume`` and it exists.

    Everything that can fail is checked before anything is written: the folder is writable with room for the
    checkpoints, and a run to resume has this config, split and genes (else one line, files untouched). Temp
    files of interrupted checkpoint writes are removed.
    """
    out = Path(out_dir) if out_dir else None
    start = None
    if out is not None:
        if is_main():
            check_writable(out, folder=True, need_bytes=checkpoint_bytes(network))
            for tmp in clean_temp_files(out, CHECKPOINT_NAMES):
                logger.info("removed %s, left by an interrupted checkpoint write", tmp.name)
        start = resume_point(out) if resume else None
        if start is not None:
            old = check_resumable(start, meta())
            step, planned = old.get("state", {}).get("step", 0), Config.from_checkpoint(old["config"]).train.max_steps
            total = cfg.train.max_steps
            if step >= total:
                logger.info("%s already reached step %d of %d: nothing to train (raise max_steps to continue)",
                            out, step, total)
            else:
                logger.info("resuming %s at step %d of %d%s", out, step, total,
                            f" (planned for {planned}: the learning-rate schedule now ends at {total})"
                            if planned != total else "")
        if is_main():  # under torchrun only rank 0 writes files
            atomic_write_text(out / "config.toml", cfg.to_toml())
            for name, write in (files or {}).items():
                write(out / name)
    trainer = Trainer(network, process, dataset, cfg, meta=meta, validate=validate, out_dir=out, device=device,
                      extra_tensors=extra_tensors)
    if start is not None:
        trainer.resume(start)
    trainer.start_step = trainer.state.step
    return trainer
