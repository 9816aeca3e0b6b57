"""perturbdiff.data"""

from perturbdiff.data._keys import DataKeys
from perturbdiff.data._preprocess import apply_record, get_record, preprocess
from perturbdiff.data._sets import CellSetDataset, CellSetIndex, make_loader
from perturbdiff.data._split import STRATEGIES, Condition, Split, condition_labels, make_split
from perturbdiff.data._store import CellStore, open_store, preprocess_store, write_store
from perturbdiff.data._validate import register
from perturbdiff.data._vocab import Covariates, Vocab

__all__ = [
    "DataKeys",
    "register",
    "preprocess",
    "get_record",
    "apply_record",
    "Condition",
    "Split",
    "STRATEGIES",
    "make_split",
    "condition_labels",
    "Vocab",
    "Covariates",
    "CellSetIndex",
    "CellSetDataset",
    "make_loader",
    "CellStore",
    "open_store",
    "write_store",
    "preprocess_store",
]
