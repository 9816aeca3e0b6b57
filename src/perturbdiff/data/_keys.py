"""DataKeys: what the user declares about an AnnData (which obs columns mean what, and the scale of X)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: how a split holds conditions out (``make_split``); here so the CLI lists them without importing pandas
STRATEGIES = (
    "held-out-contexts-partial",
    "held-out-contexts",
    "held-out-perturbations",
    "held-out-combinations",
)

INPUT_KINDS = ("counts", "log1p")


@dataclass(frozen=True)
class DataKeys:
    """Obs columns (perturbation, context, batch, dose), the control value, and whether X is counts/log1p."""

    pert_key: str
    control_value: str
    context_keys: tuple[str, ...]
    input_kind: str  # "counts" | "log1p" (validated by register)
    batch_key: str | None = None
    dose_key: str | None = None

    def __post_init__(self) -> None:
        ctx = self.context_keys
        ctx = (ctx,) if isinstance(ctx, str) else tuple(str(c) for c in ctx)
        object.__setattr__(self, "context_keys", ctx)
        object.__setattr__(self, "control_value", str(self.control_value))

    @property
    def columns(self) -> tuple[str, ...]:
        """Every obs column the keys name, in a fixed order, without duplicates."""
        cols = (self.pert_key, *self.context_keys, self.batch_key, self.dose_key)
        return tuple(dict.fromkeys(c for c in cols if c is not None))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_keys"] = list(self.context_keys)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataKeys:
        return cls(
            pert_key=d["pert_key"],
            control_value=d["control_value"],
            context_keys=tuple(d["context_keys"]),
            input_kind=d["input_kind"],
            batch_key=d.get("batch_key"),
            dose_key=d.get("dose_key"),
        )
