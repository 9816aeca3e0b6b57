"""The run base class: what every trained object holds (config, network, vocabularies, codec, process) and the
metadata, save, load and info written once; ``load_run`` dispatches on the checkpoint's kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from perturbdiff._errors import CheckpointError, ConfigError
from perturbdiff._logging import logger
from perturbdiff._version import __version__
from perturbdiff.config import Config
from perturbdiff.data import Vocab, codec_from_meta
from perturbdiff.diffusion import make_process
from perturbdiff.model._generate import default_device
from perturbdiff.nn import Denoiser
from perturbdiff.train import Trainer, load_checkpoint, run_trainer, save_checkpoint, split_prefix

#: checkpoint kinds: written by ``perturbdiff train`` (no "kind" before the redesign) and ``perturbdiff pretrain``
TASK, PRETRAIN = "task", "pretrain"


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file: ``path`` itself, or the ``which`` (else best, last, model) checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        for name in (which, "best", "last", "model"):
            if (path / f"{name}.safetensors").exists():
                return path / f"{name}.safetensors"
        raise CheckpointError(f"no checkpoint (best/last/model.safetensors) in {path}")
    return path


def checkpoint_kind(path: str | Path, which: str = "best") -> str:
    """``task`` or ``pretrain``: what wrote the checkpoint (its header only is read)."""
    _, meta = load_checkpoint(resolve_checkpoint(path, which), prefixes=("\0",))
    return meta.get("kind", TASK)


def is_pretrained_run(path: str | Path, which: str = "best") -> bool:
    """Whether ``path`` (a run directory or checkpoint) was written by ``perturbdiff pretrain`` (False when it
    holds no readable checkpoint: loading it then names the problem)."""
    try:
        return checkpoint_kind(path, which) == PRETRAIN
    except CheckpointError:
        return False


class Run:
    """A trainable, savable model object; subclasses add what their kind knows (``_own_meta``, ``_from_meta``)."""

    kind: ClassVar[str] = TASK

    def __init__(self, cfg: Config, network: Denoiser, vocab: Vocab, codec, *, summary: dict | None = None):
        self.cfg, self.network, self.vocab, self.codec = cfg, network, vocab, codec
        self.summary = summary or {}
        self.process = make_process(cfg.diffusion, codec)
        self.trainer: Trainer | None = None

    # -- metadata --------------------------------------------------------------------------------------------
    def _own_meta(self) -> dict[str, Any]:
        return {}

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.cfg.to_dict(), "vocab": self.vocab.to_dict(),
                "codec": self.codec.to_dict(), "summary": self.summary, **self._own_meta(),
                "versions": {"perturbdiff": __version__, "torch": torch.__version__}}

    # -- training --------------------------------------------------------------------------------------------
    def _budget(self, max_steps: int | None) -> Config:
        """``max_steps`` becomes the run's budget (the learning-rate schedule ends there)."""
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        if max_steps and max_steps != self.cfg.train.max_steps:
            self.cfg = self.cfg.update({"train": {"max_steps": int(max_steps)}})
        return self.cfg

    def _fit(self, dataset, max_steps: int | None, out_dir, *, validate=None, progress: bool, resume: bool,
             device, files=None, what: str = "training") -> Trainer:
        """Train ``self.network`` on ``dataset`` through the process; checkpoints under ``out_dir``."""
        cfg = self.cfg
        self.trainer = run_trainer(self.network, self.process, dataset, cfg, meta=self._meta, validate=validate,
                                   out_dir=out_dir, device=device or default_device(), resume=resume, files=files,
                                   extra_tensors=self._extra_tensors)
        logger.info("%s on %d sets/epoch of %d cells, %d parameters", what, len(dataset), cfg.data.set_size,
                    sum(p.numel() for p in self.network.parameters()))
        self.trainer.fit(max_steps, progress=progress)
        return self.trainer

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the current (EMA after training) weights and metadata to one safetensors file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "model.safetensors"
        tensors = {f"ema.{k}": v for k, v in self.network.state_dict().items()}
        return save_checkpoint(path, {**tensors, **self._extra_tensors()}, self._meta())

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors beside the weights in every checkpoint: the codec's (a kind adds its own)."""
        return {f"codec.{k}": v for k, v in self.codec.tensors().items()}

    def set_codec(self, codec) -> None:
        """Use ``codec`` (a fitted latent codec replacing its unfitted settings); the process follows it."""
        self.codec = codec
        self.process = make_process(self.cfg.diffusion, codec)

    @classmethod
    def load(cls, path: str | Path, *, which: str = "best", **kwargs):
        """Load a run directory (``best``/``last``/``model`` checkpoint) or a ``.safetensors`` file; no pickle."""
        path = resolve_checkpoint(path, which)
        tensors, meta = load_checkpoint(path, prefixes=("ema.", "codec.", "anchor."))
        kind = meta.get("kind", TASK)
        if kind != cls.kind:
            raise CheckpointError(WRONG_KIND[cls.kind].format(path=path))
        cfg = Config.from_checkpoint(meta["config"])
        vocab = Vocab.from_dict(meta["vocab"])
        run = cls._from_meta(cfg, meta, vocab, codec_from_meta(meta, cfg.codec, tensors), tensors, **kwargs)
        try:
            run.network.load_state_dict(split_prefix(tensors, "ema"))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the recorded model configuration ({e})") from None
        run.network.eval()
        run.checkpoint_meta = {k: meta.get(k) for k in ("state", "versions")}
        return run

    @classmethod
    def _from_meta(cls, cfg: Config, meta: dict, vocab: Vocab, codec, tensors: dict, **kwargs) -> Run:
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        """The experiment in a few numbers, for a prediction's record and the report's card: process, size,
        trained steps (and the best one, when the run came from a checkpoint)."""
        m, d = self.cfg.model, self.cfg.data
        state = (getattr(self, "checkpoint_meta", {}) or {}).get("state") or {}
        card = {"kind": self.kind, "process": self.cfg.diffusion.process, "hidden": m.hidden, "depth": m.depth,
                "set_size": d.set_size, "parameters": int(sum(p.numel() for p in self.network.parameters())),
                "max_steps": self.cfg.train.max_steps, "codec": self.codec.kind}
        if self.codec.kind == "latent":
            card["latent_dim"] = self.codec.dim
        card.update({k: state[k] for k in ("step", "best_step") if state.get(k) is not None})
        return card

    def info(self) -> dict[str, Any]:
        """What the run knows (its kind adds its own entries), with the checkpoint's step and versions."""
        return {"kind": self.kind, "summary": self.summary, "config": self.cfg.to_dict(),
                "codec": self.codec.to_dict(), **getattr(self, "checkpoint_meta", {})}


WRONG_KIND = {
    TASK: "{path} is a pretraining run (`perturbdiff pretrain`): finetune it, or predict zero-shot with "
          "perturbdiff.Pretrained.load",
    PRETRAIN: "{path} is not a pretraining run (written by `perturbdiff train`?): use PerturbDiff.load / "
              "`perturbdiff predict` for it",
}


def build_network(cfg: Config, width: int, vocab: Vocab, *, pert_table=None, n_datasets: int = 1) -> Denoiser:
    """The denoiser over model-space cells of ``width`` values (genes, or a latent codec's dimensions)."""
    return Denoiser(cfg.model, width, vocab.sizes, pert_table=pert_table, n_datasets=n_datasets,
                    dose_values=vocab.dose_numbers())



