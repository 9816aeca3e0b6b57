"""Self-describing checkpoints in one safetensors file: tensors + a JSON header; never unpickled (STYLE §6).

Layout of the tensor names: ``model.*`` raw weights, ``ema.*`` EMA weights, ``optim.<param>.<key>`` AdamW state,
``rng.*`` random-generator states. Everything else (config, preprocessing record, vocabularies, split, step, optimiser
hyper-parameters) is JSON in the safetensors metadata under the key ``perturbdiff``. One file, written to a temp name
and renamed, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from perturbdiff._errors import CheckpointError
from perturbdiff._io import atomic_write

FORMAT = 1
META_KEY = "perturbdiff"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON ``meta`` to ``path``."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {META_KEY: json.dumps({"format": FORMAT, **meta})}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def load_checkpoint(path: str | Path, prefixes: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """Read (tensors, meta); only safetensors is accepted, anything else is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            names = [k for k in fh.keys() if prefixes is None or k.startswith(prefixes)]
            tensors = {k: fh.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without PerturbDiff metadata")
    meta = json.loads(raw)
    if meta.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer PerturbDiff (format {meta['format']})")
    return tensors, meta


def _refuse_pickle(path: Path) -> None:
    """Pickle and torch.save zip files start with known magic bytes: name the problem instead of a parse error.

    A safetensors file starts with its header length (u64, little-endian) and then the JSON header's ``{``; its
    first byte may be 0x80 like a pickle's, so a file shaped like safetensors is never refused here.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size:
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} holds a pickle / torch.save payload; PerturbDiff loads only safetensors and refuses to unpickle"
        )


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors + JSON (param groups and non-tensor state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in split_prefix(tensors, "optim").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for name, val in info.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = info["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
