"""``minmax`` observer: the range ``[min, max]`` per group, optionally as a moving average."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monoquant_core import (
    Capabilities,
    ComponentConfig,
    Observer,
    QParams,
    UsageError,
    hookimpl,
    minmax_qparams,
)
from monoquant_core.layout import to_groups


@dataclass(frozen=True)
class MinMaxConfig(ComponentConfig):
    """Options of the ``minmax`` observer.

    Attributes:
        averaging_constant: None (default) keeps the running min/max over all updates; a value
            ``c`` in (0, 1] keeps ``min <- (1 - c) * min + c * batch_min`` instead (for
            activations over many calibration batches; weights are observed once either way).
    """

    averaging_constant: float | None = None

    def __post_init__(self) -> None:
        c = self.averaging_constant
        if c is not None and not 0.0 < c <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {c}")


class MinMaxObserver(Observer):
    """Tracks the minimum and maximum of every ``[C, G]`` group."""

    name = "minmax"
    config_class = MinMaxConfig
    capabilities = Capabilities(granularities=("per-tensor", "per-channel", "group"))

    def __init__(self, spec, config=None):
        super().__init__(spec, config)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        g = to_groups(x.detach(), self.spec.axis, self.spec.group_size)
        mn, mx = g.amin(dim=-1).float(), g.amax(dim=-1).float()
        c = self.config.averaging_constant
        if self.min is None:
            self.min, self.max = mn, mx
        elif c is None:
            self.min, self.max = torch.minimum(self.min, mn), torch.maximum(self.max, mx)
        else:
            self.min = (1 - c) * self.min + c * mn
            self.max = (1 - c) * self.max + c * mx

    def qparams(self) -> QParams:
        if self.min is None or self.max is None:
            raise UsageError("the minmax observer saw no data", "call update() before qparams()")
        return minmax_qparams(self.min, self.max, self.spec)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "minmax"


@hookimpl
def monoquant_register_observers(register):
    register(MinMaxObserver)
