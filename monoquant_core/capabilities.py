"""Capabilities: what a component supports, checked at plan time before any compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CapabilityError

__all__ = ["Capabilities"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Capabilities:
    """Declared support of a scheme, observer, replacer or backend.

    Empty tuples mean "no restriction". Impossible combinations fail at plan time with a
    :class:`~monoquant_core.errors.CapabilityError` that names the component and the choices.

    Attributes:
        bits: code widths produced or consumed.
        group_sizes: supported group sizes (None = per-channel / per-tensor).
        symmetric: supported symmetry modes (True, False).
        granularities: e.g. ``("per-channel", "per-tensor")``.
        dtypes: floating dtypes of the weights / activations handled.
        devices: device types (``"cpu"``, ``"cuda"``).
        needs_calibration: True when activation statistics are required.
        numerics: how a backend computes (e.g. ``"fp32 dequantize"``, ``"bf16 activations"``).
    """

    bits: tuple[int, ...] = ()
    group_sizes: tuple[int | None, ...] = ()
    symmetric: tuple[bool, ...] = ()
    granularities: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = _FLOATS
    devices: tuple[str, ...] = ()
    needs_calibration: bool = False
    numerics: str = ""

    def require(self, owner: str, field_name: str, value: object) -> None:
        """Raise ``CapabilityError`` unless ``value`` is one of the declared ``field_name``."""
        allowed: tuple[object, ...] = tuple(getattr(self, field_name))
        if allowed and value not in allowed:
            shown = ", ".join(_fmt(a) for a in allowed)
            raise CapabilityError(
                f"{owner} does not support {field_name.rstrip('s').replace('_', ' ')} "
                f"{_fmt(value)} (supported: {shown})",
                f"choose one of {shown}",
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "bits": list(self.bits),
            "group_sizes": list(self.group_sizes),
            "symmetric": list(self.symmetric),
            "granularities": list(self.granularities),
            "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
            "devices": list(self.devices),
            "needs_calibration": self.needs_calibration,
            "numerics": self.numerics,
        }


def _fmt(v: object) -> str:
    if v is None:
        return "none"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v).lower() if isinstance(v, bool) else str(v)
