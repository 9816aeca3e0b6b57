"""The guidance weight chosen on validation (``train.val_guidance``).

Guidance mixes the conditional and the unconditional branch, ``(1 + w)·cond − w·uncond``. With an anchor the
unconditional branch is the anchor's baseline population with the model's spread, so a weight ``w < 0`` leans the
prediction towards the baseline, shrinking what the labels add. Whether that helps depends on the data set: it
helped where the labels carry little (held-out doubles of parts never trained alone, a held-out cell line) and
hurt where they carry much (IFN-β on held-out cell types), so no one weight is right everywhere
(docs/BENCHMARKS.md, "Eighth pass"). With candidate weights the validator scores every checkpoint at each of them
and keeps the best pair; the weight travels in the checkpoint's summary, and ``predict`` uses it unless told
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from perturbdiff._config_rules import guidance_weights
from perturbdiff._logging import logger
from perturbdiff.model._generate import sample_settings
from perturbdiff.train import load_checkpoint, selection_score


def choosing_validator(validate: Callable, run) -> Callable:
    """``validate`` itself without ``train.val_guidance``; else a validator that scores ``validate(net, settings)``
    at each candidate weight and returns the scores of the weight whose selection score (``train.val_select``) is
    lowest, with ``val_guidance`` = that weight, writing the choice into ``run.summary["guidance"]`` before the
    trainer saves a checkpoint. Its ``.history`` maps each validated step to its choice, so the best checkpoint's
    choice can be read back without its file."""
    weights, rule = guidance_weights(run.cfg.train.val_guidance), run.cfg.train.val_select
    if not weights:
        return validate

    def validate_each(net) -> dict:
        scores = {w: validate(net, sample_settings(run.cfg.sample, guidance=w)) for w in weights}
        ranked = {w: selection_score(s, rule) for w, s in scores.items()}
        best = min(weights, key=lambda w: ranked[w])  # ties: the first listed
        run.summary["guidance"] = {"chosen": best, "scores": {str(w): ranked[w] for w in weights}}
        trainer = getattr(run, "trainer", None)
        if trainer is not None:
            validate_each.history[trainer.state.step] = run.summary["guidance"]
        return {**scores[best], "val_guidance": best}

    validate_each.history = {}
    return validate_each


def settle_guidance(run, trainer, validate) -> None:
    """After training: ``run.summary["guidance"]`` is the best checkpoint's choice (read from its file when the run
    writes one, so a resumed run whose best came before the resume gets it too)."""
    history = getattr(validate, "history", None)
    if history is None:
        return
    path = trainer.checkpoint_path("best")
    if path is not None and Path(path).exists():
        chosen = load_checkpoint(path, prefixes=())[1].get("summary", {}).get("guidance")
    else:
        chosen = history.get(trainer.state.best_step)
    if chosen is None:
        run.summary.pop("guidance", None)
        return
    run.summary["guidance"] = chosen
    logger.info("guidance weight chosen on validation: w = %g (selection scores %s)", chosen["chosen"],
                ", ".join(f"{w}: {s:.4f}" for w, s in chosen["scores"].items()))


def chosen_guidance(run) -> float | None:
    """The weight the run chose on validation, or None (then ``sample.guidance``)."""
    chosen = (run.summary or {}).get("guidance")
    return None if not chosen else float(chosen["chosen"])
