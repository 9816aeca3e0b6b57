"""perturbdiff.model: the run objects (one base class), their one generation path and the output layout.

``PerturbDiff`` learns perturbation responses from a split; ``Pretrained`` learns unperturbed cells of several data
sets and predicts zero-shot; ``finetune`` starts a task run from a pretrained one; ``load_run`` loads either.
``PerturbDiff.debias`` corrects predicted pseudobulks by the model's error on held-out measured conditions
(``check_related`` names what is wrong with them before any work).
"""

from perturbdiff.model._controls import predict_for_controls
from perturbdiff.model._debias import check_related, generated_responses, measured_responses
from perturbdiff.model._finetune import finetune, transfer_weights
from perturbdiff.model._generate import default_device
from perturbdiff.model._load import load_run
from perturbdiff.model._perturbdiff import PerturbDiff
from perturbdiff.model._pretrained import Pretrained, pretrain_config
from perturbdiff.model._run import (
    Run,
    checkpoint_kind,
    is_pretrained_run,
    resolve_checkpoint,
)

__all__ = ["Run", "PerturbDiff", "Pretrained", "finetune", "transfer_weights", "pretrain_config",
           "predict_for_controls", "load_run", "checkpoint_kind", "is_pretrained_run", "resolve_checkpoint",
           "default_device", "check_related", "generated_responses", "measured_responses"]
