"""What every contract suite shares: how it builds engines, and small helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..engine import Engine
from ..markers import hookimpl as _hookimpl
from ..options import ComponentConfig
from ..plan import PlanEntry
from .engines import hermetic_engine

__all__ = ["Contract", "QuantizeSpy", "assert_unchanged", "check_config_class", "state_snapshot"]


class Contract:
    """Base of the contract suites (not collected by pytest: its name has no ``Test``).

    Attributes:
        plugins: plugin objects to register besides the installed entry points (e.g. your
            plugin module, for tests that run before the distribution is installed).
        entry_points: discover installed plugins.
        distributions: only these distributions' entry points (plus the built-ins) load;
            None loads every installed plugin.
    """

    plugins: ClassVar[tuple[Any, ...]] = ()
    entry_points: ClassVar[bool] = True
    distributions: ClassVar[tuple[str, ...] | None] = None

    def make_engine(self, *extra: Any, disable: tuple[str, ...] = ()) -> Engine:
        """A fresh strict Engine with this suite's plugins (and ``extra`` plugin objects)."""
        return hermetic_engine(
            (*self.plugins, *extra),
            entry_points=self.entry_points,
            distributions=self.distributions,
            disable=disable,
        )

    def engine_without_plugin(self, engine: Engine, plugin: str) -> Engine:
        """A fresh Engine like ``engine`` but without the plugin named ``plugin``."""
        info = engine.plugin_info(plugin)
        if info.source == "entry-point":
            return self.make_engine(disable=(plugin,))
        return hermetic_engine(
            tuple(p for p in self.plugins if p is not info.plugin),
            entry_points=self.entry_points,
            distributions=self.distributions,
        )

    @pytest.fixture
    def contract_engine(self) -> Engine:
        """The Engine each contract test runs on (fresh per test)."""
        return self.make_engine()


class QuantizeSpy:
    """A plugin that counts ``monoquant_quantize_weights`` calls (to prove nothing was
    computed) and can fail the run in ``monoquant_module_done`` of one entry."""

    monoquant_plugin_name = "contract-spy"

    def __init__(self, fail_on: str | None = None):
        self.calls = 0
        self.fail_on = fail_on

    @_hookimpl(wrapper=True)
    def monoquant_quantize_weights(self, entry: PlanEntry, module: nn.Module):
        self.calls += 1
        return (yield)

    @_hookimpl
    def monoquant_module_done(self, entry: PlanEntry, result: Any) -> None:
        if entry.name == self.fail_on:
            raise RuntimeError(f"contract-spy fails the run at {entry.name!r}")


def check_config_class(cls: type, owner: str) -> None:
    """A component's ``config_class``: a frozen dataclass deriving from ComponentConfig,
    constructible without arguments, with an integer ``version``."""
    assert isinstance(cls, type) and issubclass(cls, ComponentConfig), (
        f"{owner}: config_class {cls!r} must subclass monoquant_core.ComponentConfig"
    )
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, (  # type: ignore[attr-defined]
        f"{owner}: config_class {cls.__name__} must be a @dataclass(frozen=True)"
    )
    cfg = cls()
    assert isinstance(cfg.version, int), f"{owner}: config version must be an int"


def state_snapshot(model: nn.Module) -> dict[str, Any]:
    """Module types and object ids by name, plus cloned tensors, for :func:`assert_unchanged`."""
    return {
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, snapshot: dict[str, Any], what: str) -> None:
    """Same modules (the very objects) and bit-identical tensors (NaN equals NaN)."""
    now = {n: (type(m), id(m)) for n, m in model.named_modules()}
    assert now == snapshot["modules"], f"{what}: the model's modules were replaced"
    state = model.state_dict()
    assert state.keys() == snapshot["state"].keys(), f"{what}: the model's state_dict changed"
    for k, before in snapshot["state"].items():
        after = state[k]
        same = before.dtype == after.dtype and before.shape == after.shape
        if same and before.is_floating_point():
            same = torch.allclose(before, after, rtol=0.0, atol=0.0, equal_nan=True)
        elif same:
            same = torch.equal(before, after)
        assert same, f"{what}: tensor {k!r} of the input model changed"
