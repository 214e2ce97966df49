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
        schemes: (backends) the schemes it is meant for. A backend selection passes over a
            backend not meant for a weight's scheme silently; one that is meant for it but
            cannot run it (``supports()`` gives a reason, or it is unavailable) is named in the
            plan with that reason.
        activations: (backends) the input quantization modes it is meant for (``"none"``,
            ``"dynamic"``, ...), with the same effect on selection notes as ``schemes``.
        numerics: how a backend computes (e.g. ``"fp32 dequantize"``, ``"bf16 activations"``).
    """

    bits: tuple[int, ...] = ()
    group_sizes: tuple[int | None, ...] = ()
    symmetric: tuple[bool, ...] = ()
    granularities: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = _FLOATS
    devices: tuple[str, ...] = ()
    needs_calibration: bool = False
    schemes: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    numerics: str = ""

    def meant_for(self, scheme: str, activations: str) -> bool:
        """False when ``schemes`` / ``activations`` are declared and exclude these."""
        return (not self.schemes or scheme in self.schemes) and (
            not self.activations or activations in self.activations
        )

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
            "schemes": list(self.schemes),
            "activations": list(self.activations),
            "numerics": self.numerics,
        }


def _fmt(v: object) -> str:
    if v is None:
        return "none"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v).lower() if isinstance(v, bool) else str(v)
