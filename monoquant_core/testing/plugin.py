"""The Mono Quant pytest plugin (opt-in): fixtures for testing plugins.

Enable it in the ``conftest.py`` at the top of your tests (it is never registered
automatically through a ``pytest11`` entry point)::

    pytest_plugins = ["monoquant_core.testing.plugin"]

Fixtures:

* ``mq_engine`` — a fresh :class:`~monoquant_core.Engine` per test, built by
  :func:`~monoquant_core.testing.engines.hermetic_engine` (strict, unaffected by
  ``MONOQUANT_DISABLE_PLUGINS``/``MONOQUANT_STRICT_PLUGINS``). Override the fixtures
  ``mq_plugins`` (extra plugin objects, default none), ``mq_entry_points`` (default True)
  or ``mq_distributions`` (only these distributions' entry points plus the built-ins; default
  None = every installed one) to change what it loads.
* ``fake_distribution`` — ``fake_distribution(name, entry_points, modules, version="0.1.0")``
  writes an installed-looking ``dist-info`` plus modules under ``tmp_path`` and puts it on
  ``sys.path``, so the real entry-point discovery finds it; undone after the test.
* ``tiny_models`` — :func:`~monoquant_core.testing.models.tiny_models`: seeded MLP, outlier
  MLP, conv, embedding, transformer-block and custom-wrapper models with example inputs.
* ``assert_sqnr`` — :func:`~monoquant_core.testing.asserts.assert_sqnr`.
* ``assert_roundtrip_exact`` — ``assert_roundtrip_exact(qmodel, build, inputs, engine=None,
  serializers=None)``: :func:`~monoquant_core.testing.asserts.assert_roundtrip_exact` writing
  into ``tmp_path`` (``engine`` defaults to ``mq_engine``).
* ``cli_runner`` — :class:`~monoquant_core.testing.runner.MonoQuantRunner`:
  ``cli_runner.invoke("plugins")`` runs the ``monoquant`` command in-process.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..engine import Engine
from . import make_fake_distribution
from .asserts import assert_roundtrip_exact as _assert_roundtrip_exact
from .asserts import assert_sqnr as _assert_sqnr
from .engines import hermetic_engine
from .models import TinyModel
from .models import tiny_models as _tiny_models
from .runner import MonoQuantRunner


@pytest.fixture
def mq_plugins() -> tuple[Any, ...]:
    """Plugin objects ``mq_engine`` registers besides the entry points (override it)."""
    return ()


@pytest.fixture
def mq_entry_points() -> bool:
    """Whether ``mq_engine`` discovers installed plugins (override it)."""
    return True


@pytest.fixture
def mq_distributions() -> tuple[str, ...] | None:
    """Distributions whose entry points ``mq_engine`` loads (None: all; override it)."""
    return None


@pytest.fixture
def mq_engine(
    mq_plugins: tuple[Any, ...], mq_entry_points: bool, mq_distributions: tuple[str, ...] | None
) -> Engine:
    """A fresh, strict Engine, unaffected by the plugin environment variables."""
    return hermetic_engine(mq_plugins, entry_points=mq_entry_points, distributions=mq_distributions)


@pytest.fixture
def fake_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Path]]:
    """``fake_distribution(name, entry_points, modules=None, version="0.1.0") -> root``."""
    modules_made: list[str] = []

    def make(
        name: str,
        entry_points: dict[str, str],
        modules: dict[str, str] | None = None,
        version: str = "0.1.0",
    ) -> Path:
        root = make_fake_distribution(
            tmp_path / "fake-distributions" / name, name, version, entry_points, modules
        )
        monkeypatch.syspath_prepend(str(root))
        modules_made.extend(modules or {})
        return root

    yield make
    for mod in modules_made:  # a later test may write a module of the same name
        sys.modules.pop(mod, None)


@pytest.fixture
def tiny_models() -> dict[str, TinyModel]:
    """Seeded tiny models with example inputs, by name."""
    return _tiny_models()


@pytest.fixture
def assert_sqnr() -> Callable[..., float]:
    """``assert_sqnr(ref, approx, floor_db, what="tensor") -> measured dB``."""
    return _assert_sqnr


@pytest.fixture
def assert_roundtrip_exact(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., dict[str, Any]]:
    """``assert_roundtrip_exact(qmodel, build, inputs, engine=None, serializers=None)``."""
    directory = tmp_path / "roundtrip"
    directory.mkdir(exist_ok=True)

    def check(
        qmodel: Any,
        build: Callable[[], Any],
        inputs: Any,
        engine: Engine | None = None,
        serializers: Any = None,
    ) -> dict[str, Any]:
        eng = engine if engine is not None else request.getfixturevalue("mq_engine")
        return _assert_roundtrip_exact(eng, qmodel, build, inputs, directory, serializers)

    return check


@pytest.fixture
def cli_runner() -> MonoQuantRunner:
    """Runs ``monoquant`` in-process: ``cli_runner.invoke("plugins", "--json")``."""
    return MonoQuantRunner()
