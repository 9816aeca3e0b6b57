"""perturbdiff.data: registration, preprocessing, splits, vocabularies, cell sets and the on-disk store.

Names are imported on first use, so a command that needs none of them (``perturbdiff --help``) starts fast.
"""

from perturbdiff._lazy import lazy_names

_WHERE = {
    "DataKeys": "_keys", "STRATEGIES": "_keys",
    "apply_record": "_preprocess", "get_record": "_preprocess", "preprocess": "_preprocess",
    "CellSetDataset": "_sets", "CellSetIndex": "_sets", "draw_positions": "_sets",
    "validation_cells": "_set_tables",
    "SetLoader": "_loader", "make_loader": "_loader", "shard_batches": "_loader", "collate_sets": "_loader",
    "Condition": "_split", "Split": "_split", "condition_labels": "_split", "make_split": "_strategies",
    "CellStore": "_store", "StoreMatrix": "_store", "MARKER": "_store", "is_store": "_store", "open_store": "_store",
    "nonzero_stats": "_store", "row_mean": "_store",
    "write_store": "_store_write", "write_store_blocks": "_store_write",
    "preprocess_store": "_store_preprocess",
    "MarginalSource": "_marginal", "marginal_source": "_marginal",
    "as_csr": "_matrix", "row_reader": "_matrix", "group_means": "_matrix",
    "ScaleCodec": "_codec", "CODECS": "_codec", "codec_from_meta": "_codec", "new_codec": "_codec",
    "LatentCodec": "_latent",
    "align_genes": "_preprocess", "MODEL_SCALE": "_preprocess",
    "read_embedding_table": "_embeddings", "align_table": "_embeddings",
    "label": "_split", "labels": "_split", "training_mask": "_split", "training_means": "_split",
    "condition_shifts": "_split", "condition_codes": "_split", "obs_codes": "_split",
    "unseen_error": "_vocab", "UNKNOWN": "_vocab", "PAD": "_vocab",
    "MarginalSetDataset": "_marginal", "gene_vocabulary": "_marginal", "gene_masks": "_marginal",
    "CONTEXT_SEP": "_marginal",
    "register": "_validate",
    "Covariates": "_vocab", "Vocab": "_vocab", "dose_number": "_vocab",
    "Context": "_split", "pert_parts": "_split",
    "check_obs": "_validate",
    "value_stats": "_validate",
    "PriorBlock": "_priors", "build_priors": "_priors", "parse_routes": "_priors", "training_shifts": "_priors",
    "prior_summary": "_priors", "part_routes": "_priors",
    "knowledge_block": "_priors", "coexpression_block": "_priors", "effects_block": "_priors",
}

__all__ = list(_WHERE)


__getattr__ = lazy_names("perturbdiff.data", _WHERE, globals())
