"""perturbdiff.nn: the set denoiser (two-stream MM-DiT over cells) and its conditioning (SPEC §2)."""

from perturbdiff.nn._block import DatasetLinear, FinalLayer, JointAttention, TwoStreamBlock, modulate
from perturbdiff.nn._denoiser import Denoiser, count_parameters, fresh_io_weights, preset_parameter_counts
from perturbdiff.nn._embed import CovariateEncoder, TimestepEmbedder, timestep_embedding

__all__ = [
    "Denoiser",
    "DatasetLinear",
    "fresh_io_weights",
    "count_parameters",
    "preset_parameter_counts",
    "CovariateEncoder",
    "TimestepEmbedder",
    "timestep_embedding",
    "TwoStreamBlock",
    "JointAttention",
    "FinalLayer",
    "modulate",
]
