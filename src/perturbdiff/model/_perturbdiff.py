"""The public model object: ``PerturbDiff.from_config(cfg, adata, split)``, ``.train()``, ``.predict()``,
``.save()``, ``PerturbDiff.load()`` (the habits of scvi-tools / CellFlow)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from perturbdiff._errors import DataError
from perturbdiff._logging import logger
from perturbdiff.config import Config, SampleConfig
from perturbdiff.data import (
    CellSetDataset,
    CellSetIndex,
    Condition,
    DataKeys,
    ScaleCodec,
    Split,
    Vocab,
    align_genes,
    align_table,
    as_csr,
    codec_from_meta,
    dose_number,
    get_record,
    label,
    labels,
    new_codec,
    part_routes,
    pert_parts,
    prior_summary,
    row_mean,
    training_mask,
    unseen_error,
    validation_cells,
)
from perturbdiff.diffusion import energy_distance
from perturbdiff.evaluate import metric
from perturbdiff.model._anchor import Anchor
from perturbdiff.model._build import check_gene_selection, check_test_representable, prior_blocks
from perturbdiff.model._debias import MIN_EFFECT, debias
from perturbdiff.model._generate import (
    cells_to_generate,
    check_counts,
    check_doses,
    dose_units,
    generate,
    majority,
    per_condition,
    plan_sets,
    sample_settings,
)
from perturbdiff.model._guidance import choosing_validator, chosen_guidance, settle_guidance
from perturbdiff.model._output import assemble, output_uns, sampler_settings, with_real_controls
from perturbdiff.model._run import TASK, Run, build_network
from perturbdiff.nn import Denoiser
from perturbdiff.train import load_checkpoint, resume_point


class PerturbDiff(Run):
    """A trained (or trainable) set-diffusion model with everything ``predict`` needs."""

    kind = TASK

    def __init__(self, cfg: Config, network: Denoiser, vocab: Vocab, record: dict, codec, *,
                 split: Split | None = None, adata: AnnData | None = None, summary: dict | None = None,
                 anchor: Anchor | None = None):
        super().__init__(cfg, network, vocab, codec, summary=summary)
        self.record, self.split, self.adata, self.anchor = record, split, adata, anchor
        self.keys = DataKeys.from_dict(record["keys"])
        self.genes = [str(g) for g in record["genes"]]

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, adata: AnnData, split: Split) -> PerturbDiff:
        """Build vocabularies from the split's training conditions, the codec from its training cells, and a
        freshly initialised denoiser."""
        cfg.validate()
        record = get_record(adata)
        keys = DataKeys.from_dict(record["keys"])
        split.check(adata, keys)
        if list(adata.var_names) != [str(g) for g in record["genes"]]:
            raise DataError("the AnnData's genes differ from its preprocessing record; re-run preprocess")
        vocab = Vocab.build(adata, keys, split.train)
        seen = vocab.perturbations
        train_rows = np.flatnonzero(training_mask(adata, keys, split))
        blocks = prior_blocks(cfg, adata, keys, split, train_rows)
        table = None
        if blocks:  # each block's labels become representable; its columns are zero where it lacks a label
            known = set(vocab.pert)
            vocab.pert += [lab for lab in dict.fromkeys(q for b in blocks for q in b.labels) if lab not in known]
            table = torch.from_numpy(np.hstack([align_table(vocab.pert, b.labels, b.matrix) for b in blocks]))
            logger.info("perturbation priors %s: %d labels representable, %d of them not seen in training",
                        "+".join(b.route for b in blocks), len(vocab.pert) - vocab.first_label,
                        len(vocab.pert) - vocab.first_label - len(seen))
        # the scale codec is fitted here (a store: chunked); the latent one when training starts
        codec = new_codec(cfg.codec, adata.X, train_rows, scale=record["scale"], seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        network = build_network(cfg, codec.width(adata.n_vars), vocab, pert_table=table)
        if table is not None:  # table-only labels: their learned part starts at zero, only the table speaks
            with torch.no_grad():
                network.cov_encoder.pert.weight[vocab.first_label + len(seen):] = 0.0
        check_gene_selection(record, len(train_rows), adata.n_obs)
        check_test_representable(vocab, split)
        summary = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "n_train_conditions": len(split.train),
                   "n_val_conditions": len(split.val), "n_test_conditions": len(split.test),
                   "seen_perturbations": seen, "prior_blocks": prior_summary(blocks)}
        anchor, scores = None, {}
        if cfg.model.anchor == "auto":
            if cfg.codec.kind == "scale":  # a latent run has no gene-space shift to add
                anchor, scores = Anchor.choose(adata, keys, split)
        elif cfg.model.anchor:
            anchor = Anchor.fit(cfg.model.anchor, adata, keys, split.train)
        if anchor is not None:
            summary.update(anchor=anchor.route, anchor_scores=scores)
            how = (" (chosen on the validation conditions: shift MSE " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                                          scores.items()) + ")") if scores else ""
            logger.info("anchor: every set starts from the %s baseline's shift of its condition, fitted on the %d "
                        "training conditions, each left out of its own%s", anchor.route, len(anchor.conditions), how)
        return cls(cfg, network, vocab, record, codec, split=split, adata=adata, summary=summary, anchor=anchor)

    def _own_meta(self) -> dict[str, Any]:
        return {"record": self.record, "split": self.split.to_dict() if self.split else None,
                "anchor": self.anchor.to_meta() if self.anchor else None}

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._extra_tensors(), **(self.anchor.tensors() if self.anchor else {})}

    def card(self) -> dict[str, Any]:
        return {**super().card(), **({"anchor": self.anchor.route} if self.anchor else {})}

    def _offsets(self, conds: Sequence[Condition]) -> np.ndarray | None:
        """Each condition's anchor shift in model space [n, G] (None without an anchor)."""
        return None if self.anchor is None else self.anchor.offsets(conds, self.codec)

    def _part_shift(self, cond: Condition, parts: tuple[str, ...]) -> np.ndarray:
        """The anchor of ``cond`` in model space as if ``parts`` had never been perturbed (``model.anchor_unseen``)."""
        return self.anchor.offsets([cond], self.codec, without=[parts])[0]

    @classmethod
    def _from_meta(cls, cfg, meta, vocab, codec, tensors, *, adata: AnnData | None = None) -> PerturbDiff:
        table = tensors.get("ema.cov_encoder.pert_table")
        network = build_network(cfg, codec.width(len(meta["record"]["genes"])), vocab,
                                pert_table=None if table is None else torch.zeros_like(table))
        split = Split.from_dict(meta["split"]) if meta.get("split") else None
        record = meta["record"]
        anchor = Anchor.from_meta(meta.get("anchor"), tensors, DataKeys.from_dict(record["keys"]), record["genes"])
        return cls(cfg, network, vocab, record, codec, split=split, adata=adata, summary=meta.get("summary"),
                   anchor=anchor)

    @classmethod
    def load(cls, path: str | Path, *, adata: AnnData | None = None, which: str = "best") -> PerturbDiff:
        """Load a run directory (``best``/``last``/``model`` checkpoint) or a ``.safetensors`` file; no pickle."""
        return super().load(path, which=which, adata=adata)

    # -- training --------------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, out_dir: str | Path | None = None, *, progress: bool = True,
              resume: bool = True, device: str | torch.device | None = None) -> PerturbDiff:
        """Train on the split's training conditions (+ control→control sets); keeps best and last checkpoints.
        Afterwards the object holds the best checkpoint's EMA weights (SPEC §3), as the run directory does."""
        if self.adata is None or self.split is None:
            raise DataError("training needs the AnnData and split given to PerturbDiff.from_config")
        cfg = self._budget(max_steps)
        if not self.codec.fitted:
            self._fit_codec(out_dir, resume=resume, progress=progress, device=device)
        index = CellSetIndex.build(self.adata, self.keys, self.split.train, fraction=cfg.data.fraction,
                                   seed=cfg.train.seed)
        units = None if self.anchor is None else self._offsets([index.conditions[c] for c in index.unit_cond])
        unseen = cfg.model.anchor_unseen  # the data drops parts, and a dropped part takes the anchor with it
        dataset = CellSetDataset(self.adata, index, self.vocab, set_size=cfg.data.set_size, seed=cfg.train.seed,
                                 control_set_fraction=cfg.data.control_set_fraction, codec=self.codec,
                                 offsets=units, part_dropout=cfg.model.pert_dropout if unseen else 0.0,
                                 part_shift=self._part_shift if unseen and self.anchor is not None else None,
                                 mean_de_weight=cfg.diffusion.mean_de_weight,
                                 mean_de_cap=cfg.diffusion.mean_de_cap)
        validate = self._validator(device) if self.split.val else None
        trainer = self._fit(dataset, max_steps, out_dir, validate=validate, progress=progress, resume=resume,
                            device=device, files={"split.json": self.split.write})
        self.network.load_state_dict(trainer.best_weights())
        settle_guidance(self, trainer, validate)  # train.val_guidance: the weight the best checkpoint was chosen at
        return self

    def _fit_codec(self, out_dir, *, resume: bool, progress: bool, device) -> None:
        """The latent codec's autoencoder: the one of the run being resumed in ``out_dir`` (same settings), else
        fitted on the training cells (control and training conditions); its reconstruction goes into the summary.
        Under torchrun every rank fits the same autoencoder from the same seed and cells."""
        point = resume_point(Path(out_dir)) if out_dir is not None and resume else None
        if point is not None:
            tensors, meta = load_checkpoint(point, prefixes=("codec.",))
            codec = codec_from_meta(meta, self.cfg.codec, tensors)
            if codec.kind == self.codec.kind and codec.fitted and codec.settings() == self.codec.settings():
                logger.info("latent codec: the autoencoder of the run being resumed (%s)", point.name)
                self.set_codec(codec)
                self.summary["codec"] = codec.quality
                return
        rows = np.flatnonzero(training_mask(self.adata, self.keys, self.split))
        self.set_codec(self.codec.fit(self.adata.X, rows, progress=progress, device=device))
        self.summary["codec"] = self.codec.quality

    def _validator(self, device):
        """Cheap but meaningful score on validation conditions: energy distance and pearson_delta, in the scale
        codec's space (log1p / the record's scale) whatever the run's codec, so runs of either codec (and of any
        latent size) compare: a latent run's cells are decoded first (zeros drawn, seeded)."""
        conds = self.split.val[: self.cfg.train.val_max_conditions]
        index = CellSetIndex.build(self.adata, self.keys, conds)
        cells = validation_cells(index.groups, self.cfg.train.val_cells, self.cfg.train.seed, self.cfg.data.set_size)
        n_cells = [len(c) for c in cells]
        pools = [index.control_pool(i) for i in range(len(conds))]
        space = self.codec if self.codec.in_place else ScaleCodec(scale=float(self.record["scale"]))
        real = [space.to_model(as_csr(self.adata.X[c]).toarray()) for c in cells]
        ctrl_mean = [space.to_model(row_mean(self.adata.X, pool)) for pool in pools]  # store: in blocks
        unseen = self.vocab.unseen_parts([p for _, p in conds])
        if unseen:  # held-out perturbations no prior covers: the generic token is their only route
            logger.info("validation condition(s) %s hold perturbations never seen in training: validated through "
                        "the generic perturbation token", labels([c for c in conds if c[1] in unseen]))
        pearson_delta = metric("pearson_delta").compute

        owner, doses, counts = self._dose_units(self.adata, cells, n_cells, conds)

        def validate(net: torch.nn.Module, settings: SampleConfig | None = None) -> dict:
            units = self._cells(self.adata, [conds[i] for i in owner], [pools[i] for i in owner], counts,
                                settings=settings, network=net, device=device, progress=False,
                                unknown_pert="generic" if unseen else "error", doses=doses)
            pred = [np.concatenate([u for u, i in zip(units, owner) if i == c]) for c in range(len(conds))]
            if space is not self.codec:
                pred = [space.to_model(self.codec.from_model(p, seed=(0, i))) for i, p in enumerate(pred)]
            eds, rs = [], []
            for i, (r, p) in enumerate(zip(real, pred)):
                eds.append(float(energy_distance(torch.from_numpy(p)[None], torch.from_numpy(r)[None])[0]))
                rs.append(pearson_delta(p.mean(0), r.mean(0), ctrl_mean[i]))
            ed = float(np.mean(eds))
            return {"val_score": ed, "val_ed": ed, "val_pearson_delta": float(np.nanmean(rs))}

        return choosing_validator(validate, self)  # with train.val_guidance: also picks the guidance weight

    # -- prediction ------------------------------------------------------------------------------------------
    def _cells(self, adata: AnnData, conds: Sequence[Condition], pools: Sequence[np.ndarray], n_cells: Sequence[int],
               *, settings: SampleConfig | None = None, n_samples: int = 1, seed: int = 0, network=None,
               device=None, progress: bool = False, unknown_pert: str = "error",
               doses: Sequence[str] | None = None) -> list[np.ndarray]:
        """Model-space cells per (sample, condition), control sets from each condition's pool of ``adata``."""
        plan = plan_sets(n_cells, self.cfg.data.set_size, n_samples, seed, pools)
        cov = self._covariates(adata, conds, plan, unknown_pert, doses)
        cells = generate(self, plan, cov, X=adata.X, settings=settings or self.cfg.sample, seed=seed, device=device,
                         progress=progress, network=network, offsets=self._offsets(conds))
        return per_condition(cells, plan, n_cells, n_samples)

    def _covariates(self, adata: AnnData, conds, plan, unknown_pert: str = "error",
                    doses: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Covariates per planned set; the batch of a set is the majority batch of its control cells."""
        batch_values = None
        if self.keys.batch_key is not None and self.keys.batch_key in adata.obs:
            b = adata.obs[self.keys.batch_key].astype("category")
            codes = majority(b.cat.codes.to_numpy()[plan.rows])
            cats = np.asarray(b.cat.categories.astype(str), dtype=object)
            batch_values = [cats[c] if c >= 0 else None for c in codes]
        cv = self.vocab.encode([conds[i] for i in plan.cond], batch_values, None, unknown="unknown",
                               unknown_pert=unknown_pert)
        cov = {"pert": cv.pert, "context": cv.context, "batch": cv.batch, "dose": cv.dose}
        if doses is not None:  # a dose never seen: token 0 and, with the continuous encoding, its own number
            index = {d: i for i, d in enumerate(self.vocab.dose)}
            cov["dose"] = np.asarray([index.get(doses[i], 0) for i in plan.cond.tolist()], np.int64)
            if self.network.cov_encoder.dose_mlp is not None:
                number = [dose_number(doses[i]) for i in plan.cond.tolist()]
                cov["dose_value"] = np.asarray([np.nan if v is None else v for v in number], np.float32)
        return cov

    def _dose_units(self, adata: AnnData, groups: Sequence[np.ndarray], counts: Sequence[int], conditions,
                    doses: Sequence[str] = ()) -> tuple[list[int], list[str] | None, list[int]]:
        """(the condition of each generation unit, each unit's dose, cells per unit): one unit per condition for a
        run without doses; else one per (condition, dose) — the doses asked for, or those of the condition's
        measured cells ``groups[i]`` with its cells split in their proportions (:func:`dose_units`)."""
        key = self.keys.dose_key
        if key is None:
            return list(range(len(counts))), None, list(counts)
        measured = [adata.obs[key].iloc[g].astype(str).value_counts().to_dict() if key in adata.obs and len(g)
                    else {} for g in groups]
        units = dose_units(counts, list(doses), measured, [label(c) for c in conditions])
        return [i for i, _, _ in units], [d for _, d, _ in units], [n for _, _, n in units]

    def sample_settings(self, *, guidance: float | None = None, steps: int | None = None, start: str | None = None,
                        solver: str | None = None) -> SampleConfig:
        """The run's sampler settings with those given (None keeps the run's), checked like any config value."""
        guidance = chosen_guidance(self) if guidance is None else guidance  # the weight validation chose, if any
        return sample_settings(self.cfg.sample, guidance=guidance, steps=steps, start=start, solver=solver)

    def predict(self, conditions: Sequence[Condition] | None = None, *, subset: str = "test",
                adata: AnnData | None = None, n_cells: int | Sequence[int] | None = None, n_samples: int = 1,
                guidance: float | None = None, steps: int | None = None, start: str | None = None,
                solver: str | None = None, seed: int = 0, include_controls: bool = True, progress: bool = True,
                device: str | torch.device | None = None, unknown_perturbations: str = "error",
                missing_genes: str = "error", doses: Sequence[str] | None = None) -> AnnData:
        """Generate cells for ``conditions`` (default: the split's ``subset``), in log1p, cell-eval layout.

        A perturbation part never seen in training and covered by no prior (``model.pert_prior``) or embedding table
        is an error naming it; ``unknown_perturbations="generic"`` instead predicts it as the generic perturbation
        token. How each part is represented is logged and written to ``uns["perturbdiff"]["routes"]``
        (:meth:`routes`).
        ``adata``'s genes are matched to the run's by name; genes it lacks are an error naming them, or zeros with
        ``missing_genes="zero"`` (warned about when more than a few). A run with a dose key generates each condition
        at its measured cells' doses (its cells split in their proportions), or at every one of ``doses`` (known
        doses, or any number with the continuous dose encoding); the dose column is written.
        """
        adata = adata if adata is not None else self.adata
        if adata is None:
            raise DataError("predict needs an AnnData with control cells (pass adata=)")
        check_counts(n_samples=n_samples, n_cells=n_cells)
        dose_list = [d for d in check_doses(self, doses, required=False) if d is not None]
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
        routes = self.routes([p for _, p in conditions])
        for pert, how in routes.items():
            if any(not r.startswith("learned") for r in how.values()):
                logger.info("perturbation %r: %s", pert, "; ".join(f"{q} via {r}" for q, r in how.items()))
        index = CellSetIndex.build(adata, self.keys, conditions)
        pools = [index.control_pool(i) for i in range(len(conditions))]
        counts = cells_to_generate(n_cells, conditions, split=self.split, subset=subset,
                                   observed=[len(g) or len(p) for g, p in zip(index.groups, pools)])
        settings = self.sample_settings(guidance=guidance, steps=steps, start=start, solver=solver)
        owner, unit_doses, counts = self._dose_units(adata, index.groups, counts, conditions, dose_list)
        conditions, pools = [conditions[i] for i in owner], [pools[i] for i in owner]
        parts = self._cells(adata, conditions, pools, counts, settings=settings, n_samples=n_samples, seed=seed,
                            progress=progress, device=device, unknown_pert=unknown_perturbations, doses=unit_doses)
        n = len(conditions)
        pred = assemble([(j % n, j // n, self.codec.from_model(c, seed=(seed, j))) for j, c in enumerate(parts)],
                        conditions,
                        self.genes, self.keys.pert_key, self.keys.context_keys)
        if unit_doses is not None:
            pred.obs[self.keys.dose_key] = np.concatenate([np.full(len(c), unit_doses[j % n], dtype=object)
                                                           for j, c in enumerate(parts)])
        if include_controls:
            pred = with_real_controls(pred, adata, self.keys, {c for c, _ in conditions})
        pred.uns["perturbdiff"] = {**output_uns(self.record, **sampler_settings(settings, n_samples=n_samples,
                                                                                 seed=seed)),
                                   "run": json.dumps(self.card()), "routes": json.dumps(routes)}
        return pred

    def routes(self, perturbations: Sequence[str]) -> dict[str, dict[str, str]]:
        """{label: {part: how the model represents it}}: ``learned`` (seen in training, + the priors that also cover
        it), a prior route alone (``knowledge``, ``coexpression``, ``table``, ``effects (placed among A, B, C)``), or
        ``generic`` (no route: the generic perturbation token, only with unknown_perturbations="generic")."""
        blocks = self.summary.get("prior_blocks") or []
        table = self.network.cov_encoder.pert_table
        if not blocks and table is not None:  # a run from before the priors: its table is the user's
            blocks = [{"route": "table", "columns": int(table.shape[1])}]
        seen = set(self.summary.get("seen_perturbations", self.vocab.perturbations))
        where = {p: i for i, p in enumerate(self.vocab.pert)}
        out = {}
        for pert in dict.fromkeys(map(str, perturbations)):
            if pert == self.vocab.control:
                continue
            parts = {}
            for q in pert_parts(pert):
                row = table[where[q]].detach().cpu().numpy() if table is not None and q in where else None
                parts[q] = part_routes(q, row, blocks, seen)
            out[pert] = parts
        return out

    def debias(self, pred: AnnData, *, related: Sequence[Condition] | None = None, adata: AnnData | None = None,
               level: float = 0.9, fdr: float = 0.05, lam: float | None = None, min_effect: float = MIN_EFFECT,
               progress: bool = True, device: str | torch.device | None = None) -> AnnData:
        """Prediction-powered pseudobulks of the conditions in ``pred``: the generated response corrected by the
        model's error on ``related`` measured conditions held out of training (default: the split's validation
        conditions, at least two), with ``level`` prediction intervals and DE calls at ``fdr`` of responses larger
        than ``min_effect`` (log1p); ``lam`` fixes λ (1: PPI, 0: the related conditions' mean response), None tunes
        it. Conditions × genes, in log1p; see :mod:`perturbdiff.model._debias` for the layers."""
        return debias(self, pred, related=related, adata=adata, level=level, fdr=fdr, lam=lam,
                      min_effect=min_effect, progress=progress, device=device)

    def predict_for_controls(self, controls: AnnData, perturbations: Sequence[str], **kw) -> AnnData:
        """Predict responses for your own control cells (see :func:`perturbdiff.model.predict_for_controls`)."""
        from perturbdiff.model._controls import predict_for_controls

        return predict_for_controls(self, controls, perturbations, **kw)

    # -- what it knows ---------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the model knows: genes, perturbations, contexts, preprocessing, split, versions."""
        seen = self.summary.get("seen_perturbations", self.vocab.perturbations)
        contexts = {k: v[1:] for k, v in zip(self.keys.context_keys, self.vocab.contexts)}
        return {**super().info(), "n_genes": len(self.genes), "genes": self.genes, "perturbations": seen,
                "representable": self.vocab.perturbations, "control": self.vocab.control, "contexts": contexts,
                "batches": self.vocab.batch[1:], "keys": self.keys.to_dict(), "record": self.record,
                "split": self.split.summary() if self.split else None}
