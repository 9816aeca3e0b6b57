"""The public model object: ``PerturbDiff.from_config(cfg, adata, split)``, ``.train()``, ``.predict()``,
``.save()``, ``PerturbDiff.load()`` (the habits of scvi-tools / CellFlow)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from perturbdiff import __version__
from perturbdiff._errors import CheckpointError, ConfigError, DataError
from perturbdiff._logging import is_cli, logger, warn
from perturbdiff.config import Config, DiffusionConfig
from perturbdiff.data import DataKeys, get_record
from perturbdiff.data._embeddings import align_table, read_embedding_table
from perturbdiff.data._matrix import as_csr
from perturbdiff.data._preprocess import align_genes
from perturbdiff.data._sets import CellSetDataset, CellSetIndex
from perturbdiff.data._split import Condition, Split, labels, training_mask
from perturbdiff.data._store import nonzero_stats, row_mean
from perturbdiff.data._vocab import Vocab, unseen_error
from perturbdiff.diffusion import energy_distance, make_schedule
from perturbdiff.nn import Denoiser
from perturbdiff.predict import assemble, generate, majority, output_uns, plan_sets, with_controls
from perturbdiff.train import Trainer, load_checkpoint
from perturbdiff.train._checkpoint import save_checkpoint, split_prefix
from perturbdiff.train._loop import run_trainer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PerturbDiff:
    """A trained (or trainable) set-diffusion model with everything ``predict`` needs."""

    def __init__(self, cfg: Config, network: Denoiser, vocab: Vocab, record: dict, *, split: Split | None = None,
                 adata: AnnData | None = None, clip_max: float | None = None, summary: dict | None = None,
                 zero_level: float = 0.0):
        self.cfg, self.network, self.vocab, self.record = cfg, network, vocab, record
        self.split, self.adata, self.clip_max = split, adata, clip_max
        self.summary, self.zero_level = summary or {}, float(zero_level)
        self.keys = DataKeys.from_dict(record["keys"])
        self.genes = [str(g) for g in record["genes"]]
        self.scale = float(record.get("scale", 10.0))
        self.sched = make_schedule(cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
        self.trainer: Trainer | None = None

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, adata: AnnData, split: Split) -> PerturbDiff:
        """Build vocabularies from the split's training conditions and a freshly initialised denoiser."""
        cfg.validate()
        record = get_record(adata)
        keys = DataKeys.from_dict(record["keys"])
        split.check(adata, keys)
        if list(adata.var_names) != [str(g) for g in record["genes"]]:
            raise DataError("the AnnData's genes differ from its preprocessing record; re-run preprocess")
        vocab = Vocab.build(adata, keys, split.train)
        seen = vocab.perturbations
        table = None
        if cfg.model.pert_embedding:
            labels, mat = read_embedding_table(cfg.model.pert_embedding)
            vocab.pert += [lab for lab in labels if lab not in set(vocab.pert)]  # representable through the table
            table = torch.from_numpy(align_table(vocab.pert, labels, mat))
            logger.info("perturbation embeddings %s: %d labels, %d of them not seen in training",
                        cfg.model.pert_embedding, len(labels), len(vocab.pert) - 3 - len(seen))
        torch.manual_seed(cfg.train.seed)
        network = Denoiser(cfg.model, adata.n_vars, vocab.sizes, pert_table=table)
        if table is not None:  # table-only labels: their learned part starts at zero, only the table speaks
            with torch.no_grad():
                network.cov_encoder.pert.weight[3 + len(seen):] = 0.0
        train_rows = np.flatnonzero(training_mask(adata, keys, split))
        _check_gene_selection(record, len(train_rows), adata.n_obs)
        _check_test_representable(vocab, split)
        vmax, q01, nnz = nonzero_stats(adata.X, train_rows)  # store: chunked
        scale = float(record.get("scale", 10.0))
        clip_max = vmax / scale if nnz else None
        zero_level = q01 if nnz else 0.0  # lowest real non-zero level (log1p)
        summary = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "n_train_conditions": len(split.train),
                   "n_val_conditions": len(split.val), "n_test_conditions": len(split.test)}
        summary["seen_perturbations"] = seen
        return cls(cfg, network, vocab, record, split=split, adata=adata, clip_max=clip_max, summary=summary,
                   zero_level=zero_level)

    def _meta(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "record": self.record, "vocab": self.vocab.to_dict(),
                "split": self.split.to_dict() if self.split else None, "clip_max": self.clip_max,
                "zero_level": self.zero_level, "summary": self.summary,
                "versions": {"perturbdiff": __version__, "torch": torch.__version__}}

    # -- training --------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, out_dir: str | Path | None = None, *, progress: bool = True,
              resume: bool = True, device: str | torch.device | None = None) -> PerturbDiff:
        """Train on the split's training conditions (+ control→control sets); keeps best and last checkpoints."""
        if self.adata is None or self.split is None:
            raise DataError("training needs the AnnData and split given to PerturbDiff.from_config")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        if max_steps and max_steps != self.cfg.train.max_steps:  # the run's budget: the LR schedule ends there
            self.cfg = self.cfg.update({"train": {"max_steps": int(max_steps)}})
        cfg = self.cfg
        index = CellSetIndex.build(self.adata, self.keys, self.split.train, fraction=cfg.data.fraction,
                                   seed=cfg.train.seed)
        dataset = CellSetDataset(self.adata, index, self.vocab, set_size=cfg.data.set_size, seed=cfg.train.seed,
                                 control_set_fraction=cfg.data.control_set_fraction, scale=self.scale)
        validate = self._validator(device) if self.split.val else None
        self.trainer = run_trainer(self.network, cfg, dataset, meta=self._meta, validate=validate, out_dir=out_dir,
                                   device=device or default_device(), resume=resume,
                                   files={"split.json": self.split.write})
        logger.info("training %d sets/epoch of %d cells, %d parameters", len(dataset), cfg.data.set_size,
                    sum(p.numel() for p in self.network.parameters()))
        self.trainer.fit(max_steps, progress=progress)
        self._use_ema()
        return self

    def _use_ema(self) -> None:
        """After training, sample with the best checkpoint's EMA weights (SPEC §3), as a run directory does."""
        if self.trainer is not None:
            self.network.load_state_dict(self.trainer.best_weights())

    def _validator(self, device):
        """Cheap but meaningful score on validation conditions: energy distance and delta correlation."""
        conds = self.split.val[: self.cfg.train.val_max_conditions]
        index = CellSetIndex.build(self.adata, self.keys, conds)
        S = self.cfg.data.set_size
        n_cells = [min(len(g), 2 * S) for g in index.groups]
        pools = [index.control_pool(i) for i in range(len(conds))]
        real = [as_csr(self.adata.X[g[:n]]).toarray() / self.scale for g, n in zip(index.groups, n_cells)]
        ctrl_mean = [row_mean(self.adata.X, pool) / self.scale for pool in pools]  # store: in blocks

        unseen = self.vocab.unseen_parts([p for _, p in conds])
        if unseen:  # held-out perturbations: the generic token is the only route, so validation takes it
            logger.info("validation condition(s) %s hold perturbations never seen in training: validated through "
                        "the generic perturbation token", labels([c for c in conds if c[1] in unseen]))

        def validate(net: torch.nn.Module) -> dict:
            pred = self._sample(net, self.adata, pools, conds, n_cells, device=device,
                                unknown_pert="generic" if unseen else "error")
            eds, rs = [], []
            for i, (r, p) in enumerate(zip(real, pred)):
                eds.append(float(energy_distance(torch.from_numpy(p)[None], torch.from_numpy(r)[None])[0]))
                rs.append(_pearson(p.mean(0) - ctrl_mean[i], r.mean(0) - ctrl_mean[i]))
            ed, pdelta = float(np.mean(eds)), float(np.nanmean(rs))
            return {"val_score": ed, "val_ed": ed, "val_pearson_delta": pdelta}

        return validate

    # -- prediction ------------------------------------------------------------------------------------
    def _sample(self, net, adata: AnnData, pools: Sequence[np.ndarray], conds: Sequence[Condition],
                n_cells: Sequence[int], *, dcfg: DiffusionConfig | None = None, n_samples: int = 1, seed: int = 0,
                progress: bool = False, device=None, unknown_pert: str = "error",
                doses: Sequence[str] | None = None) -> list[np.ndarray]:
        """Model-space cells per (sample, condition), in that order, trimmed to n_cells; control sets from pools."""
        rows, cond, sample = plan_sets(pools, n_cells, self.cfg.data.set_size, n_samples, seed)  # (N, S), (N,), (N,)
        cov = self._covariates(adata, conds, rows, cond, unknown_pert)
        if doses is not None:
            index = {d: i for i, d in enumerate(self.vocab.dose)}
            cov["dose"] = np.asarray([index[doses[i]] for i in cond.tolist()], np.int64)
        cells = generate(net, self.sched, dcfg or self.cfg.diffusion, adata.X, rows, cov, scale=self.scale,
                         clip_max=self.clip_max, zero_threshold=self.zero_threshold(), seed=seed,
                         device=device or default_device(), progress=progress)  # (N, S, G)
        G = cells.shape[2]
        return [cells[(cond == i) & (sample == k)].reshape(-1, G)[:n] for k in range(n_samples)
                for i, n in enumerate(n_cells)]

    def zero_threshold(self) -> float:
        """Model-space values below this become 0: the configured floor, or half the lowest real level."""
        dcfg = self.cfg.diffusion
        auto = 0.5 * self.zero_level / self.scale if dcfg.auto_zero else 0.0
        return max(dcfg.zero_threshold, auto)

    def _covariates(self, adata: AnnData, conds, rows: np.ndarray, cond: np.ndarray,
                    unknown_pert: str = "error") -> dict[str, np.ndarray]:
        """Covariates per planned set; the batch of a set is the majority batch of its control cells."""
        batch_values = None
        if self.keys.batch_key is not None and self.keys.batch_key in adata.obs:
            b = adata.obs[self.keys.batch_key].astype("category")
            codes = majority(b.cat.codes.to_numpy()[rows])
            cats = np.asarray(b.cat.categories.astype(str), dtype=object)
            batch_values = [cats[c] if c >= 0 else None for c in codes]
        cv = self.vocab.encode([conds[i] for i in cond], batch_values, None, unknown="unknown",
                               unknown_pert=unknown_pert)
        return {"pert": cv.pert, "context": cv.context, "batch": cv.batch, "dose": cv.dose}

    def predict(self, conditions: Sequence[Condition] | None = None, *, subset: str = "test",
                adata: AnnData | None = None, n_cells: int | Sequence[int] | None = None, n_samples: int = 1,
                guidance: float | None = None, steps: int | None = None, start: str | None = None,
                seed: int = 0, include_controls: bool = True, progress: bool = True,
                device: str | torch.device | None = None, unknown_perturbations: str = "error",
                missing_genes: str = "error") -> AnnData:
        """Generate cells for ``conditions`` (default: the split's ``subset``), in log1p, cell-eval layout.

        A perturbation part never seen in training (and absent from the embedding table) is an error naming it;
        ``unknown_perturbations="generic"`` instead predicts it as the generic perturbation token (logged).
        ``adata``'s genes are matched to the run's by name; genes it lacks are an error naming them, or zeros with
        ``missing_genes="zero"`` (warned about when more than a few).
        """
        adata = adata if adata is not None else self.adata
        if adata is None:
            raise DataError("predict needs an AnnData with control cells (pass adata=)")
        check_counts(n_samples=n_samples, n_cells=n_cells)
        adata = align_genes(adata, self.genes, missing_genes=missing_genes)
        if conditions is None:
            if self.split is None:
                raise DataError("no conditions given and the model has no split")
            conditions = self.split.subset(subset)
        conditions = [(tuple(map(str, c)), str(p)) for c, p in conditions]
        if not conditions:
            raise DataError(f"no conditions to predict (subset {subset!r} is empty)")
        if unknown_perturbations != "generic":  # every condition no route can represent, in one line, up front
            unseen = self.vocab.unseen_parts([p for _, p in conditions])
            if unseen:
                raise unseen_error(unseen, [c for c in conditions if c[1] in unseen])
        index = CellSetIndex.build(adata, self.keys, conditions)
        n_cells = self._n_cells(index, conditions, n_cells, subset)
        dcfg = with_sampler(self.cfg.diffusion, guidance=guidance, sampler_steps=steps, sampler_start=start)
        pools = [index.control_pool(i) for i in range(len(conditions))]
        parts = self._sample(self.network, adata, pools, conditions, n_cells, dcfg=dcfg, n_samples=n_samples,
                             seed=seed, progress=progress, device=device, unknown_pert=unknown_perturbations)
        settings = {"guidance": dcfg.guidance, "steps": dcfg.sampler_steps, "start": dcfg.sampler_start,
                    "n_samples": n_samples, "seed": seed}
        n = len(conditions)
        pred = assemble([(j % n, j // n, cells) for j, cells in enumerate(parts)], conditions, self.genes,
                        self.keys, scale=self.scale)
        if include_controls:
            pred = with_controls(pred, adata, self.keys, {c for c, _ in conditions})
        pred.uns["perturbdiff"] = output_uns(self.record, **settings)
        return pred

    def predict_for_controls(self, controls: AnnData, perturbations: Sequence[str], **kw) -> AnnData:
        """Predict responses for your own control cells (see ``perturbdiff._apply.predict_for_controls``)."""
        from perturbdiff import _apply

        return _apply.predict_for_controls(self, controls, perturbations, **kw)

    def _n_cells(self, index: CellSetIndex, conditions, n_cells, subset: str) -> list[int]:
        """Cells to generate per condition: given, the split's test_n_cells, the real count, or the controls."""
        if isinstance(n_cells, (int, np.integer)):
            return [int(n_cells)] * len(conditions)
        if n_cells is not None:
            return [int(n) for n in n_cells]
        if subset == "test" and self.split is not None and self.split.test_n_cells \
                and list(conditions) == list(self.split.test):
            return list(self.split.test_n_cells)
        return [len(g) if len(g) else len(index.control_pool(i)) for i, g in enumerate(index.groups)]

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the current (EMA after training) weights and metadata to one safetensors file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "model.safetensors"
        tensors = {f"ema.{k}": v for k, v in self.network.state_dict().items()}
        return save_checkpoint(path, tensors, self._meta())

    @classmethod
    def load(cls, path: str | Path, *, adata: AnnData | None = None, which: str = "best") -> PerturbDiff:
        """Load a run directory (``best``/``last``/``model`` checkpoint) or a ``.safetensors`` file; no pickle."""
        path = _resolve_checkpoint(Path(path), which)
        tensors, meta = load_checkpoint(path, prefixes=("ema.",))
        if meta.get("kind") == "pretrain":
            raise CheckpointError(f"{path} is a pretraining run (`perturbdiff pretrain`): finetune it, or predict "
                                  "zero-shot with perturbdiff._pretrain.Pretrained.load")
        cfg = Config.from_dict(meta["config"])
        vocab = Vocab.from_dict(meta["vocab"])
        table = tensors.get("ema.cov_encoder.pert_table")
        network = Denoiser(cfg.model, len(meta["record"]["genes"]), vocab.sizes,
                           pert_table=None if table is None else torch.zeros_like(table))
        try:
            network.load_state_dict(split_prefix(tensors, "ema"))
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the recorded model configuration ({e})") from None
        split = Split.from_dict(meta["split"]) if meta.get("split") else None
        model = cls(cfg, network.eval(), vocab, meta["record"], split=split, adata=adata,
                    clip_max=meta.get("clip_max"), summary=meta.get("summary"),
                    zero_level=meta.get("zero_level", 0.0))
        model.checkpoint_meta = {k: meta.get(k) for k in ("state", "versions")}
        return model

    def info(self) -> dict[str, Any]:
        """What the model knows: genes, perturbations, contexts, preprocessing, split, versions."""
        seen = self.summary.get("seen_perturbations", self.vocab.perturbations)
        contexts = {k: v[1:] for k, v in zip(self.keys.context_keys, self.vocab.contexts)}
        return {"n_genes": len(self.genes), "genes": self.genes, "perturbations": seen,
                "representable": self.vocab.perturbations, "control": self.vocab.control, "contexts": contexts,
                "batches": self.vocab.batch[1:], "keys": self.keys.to_dict(), "record": self.record,
                "split": self.split.summary() if self.split else None, "summary": self.summary,
                "config": self.cfg.to_dict(), **getattr(self, "checkpoint_meta", {})}


def _check_gene_selection(record: dict, n_train: int, n_obs: int) -> None:
    """Warn when the genes were chosen as HVGs of more cells than the split may learn from (test cells
    included: SPEC §1 wants them chosen on training cells only)."""
    sel = record.get("gene_selection") or {}
    n_sel = sel.get("n_train_cells")
    if sel.get("method") == "hvg" and n_sel is not None and int(n_sel) > n_train:
        warn(f"the genes were chosen as HVGs of {n_sel} cells, but this split may learn from {n_train} of the "
             f"{n_obs}: held-out cells shaped the gene selection; preprocess the raw file with this split "
             "(perturbdiff preprocess --split, or preprocess(..., split=)) to choose them on training cells only")


def _check_test_representable(vocab: Vocab, split: Split) -> None:
    """Name, before training, every test condition whose perturbation no route can represent."""
    unseen = vocab.unseen_parts([p for _, p in split.test])
    if unseen:
        err = unseen_error(unseen, [c for c in split.test if c[1] in unseen])
        warn(f"known before training: {err.for_cli() if is_cli() else err}")


def _resolve_checkpoint(path: Path, which: str) -> Path:
    if path.is_dir():
        for name in (which, "best", "last", "model"):
            if (path / f"{name}.safetensors").exists():
                return path / f"{name}.safetensors"
        raise CheckpointError(f"no checkpoint (best/last/model.safetensors) in {path}")
    return path


def with_sampler(dcfg: DiffusionConfig, **changes) -> DiffusionConfig:
    """A copy of the diffusion config with the sampler settings that were given (None = keep the run's),
    checked like any config value."""
    out = dataclasses.replace(dcfg, **{k: v for k, v in changes.items() if v is not None})
    Config(diffusion=out).validate()
    return out


def check_counts(*, n_samples: int = 1, n_cells=None) -> None:
    """``n_samples`` and every ``n_cells`` at least 1 (one ConfigError before any work)."""
    if int(n_samples) < 1:
        raise ConfigError(f"n_samples must be at least 1, got {n_samples}")
    if n_cells is not None:
        values = [n_cells] if isinstance(n_cells, (int, np.integer)) else list(n_cells)
        bad = [n for n in values if int(n) < 1]
        if bad:
            raise ConfigError(f"n_cells must be at least 1, got {bad[0]}")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


