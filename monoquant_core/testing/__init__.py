"""Test kit for Mono Quant and its plugins.

* :mod:`monoquant_core.testing.models` — small seeded models and :func:`tiny_models`.
* :mod:`monoquant_core.testing.asserts` — :func:`assert_sqnr`, :func:`assert_roundtrip_exact`,
  :func:`assert_qtensor_equal`.
* :func:`make_fake_distribution` — writes an installed-looking ``dist-info`` (with entry points)
  and plugin modules into a folder, so the real entry-point discovery runs without pip.
* Contract suites (``SchemeContract``, ``ObserverContract``, ``ReplacerContract``,
  ``SerializerContract``, ``BackendContract``): subclass one, set the component's name and
  inherit its tests. They import pytest, so they load on first access only.
* :mod:`monoquant_core.testing.plugin` — the opt-in pytest plugin with the fixtures
  ``mq_engine``, ``fake_distribution``, ``tiny_models``, ``assert_sqnr``,
  ``assert_roundtrip_exact`` and ``cli_runner``. Enable it in your ``conftest.py``::

      pytest_plugins = ["monoquant_core.testing.plugin"]

  (``pytest_plugins = ["monoquant_core.testing"]`` works too.) It is never registered
  automatically. Importing this package does not import pytest.

(The marker PYTEST_DONT_REWRITE keeps pytest from warning when this package is listed in
``pytest_plugins`` after a test module imported it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .asserts import assert_qtensor_equal, assert_roundtrip_exact, assert_sqnr
from .models import (
    CustomWrapperModel,
    TinyModel,
    conv_net,
    embedding_model,
    mlp,
    odd_inputs,
    outlier_mlp,
    tiny_models,
    transformer_block,
)

__all__ = [
    "BackendContract",
    "CustomWrapperModel",
    "ObserverContract",
    "ReplacerContract",
    "SchemeContract",
    "SerializerContract",
    "TinyModel",
    "assert_qtensor_equal",
    "assert_roundtrip_exact",
    "assert_sqnr",
    "conv_net",
    "embedding_model",
    "make_fake_distribution",
    "mlp",
    "odd_inputs",
    "outlier_mlp",
    "tiny_models",
    "transformer_block",
]

#: listing this package in ``pytest_plugins`` loads the fixtures of the plugin module.
pytest_plugins = ["monoquant_core.testing.plugin"]

_CONTRACTS = {
    "SchemeContract",
    "ObserverContract",
    "ReplacerContract",
    "SerializerContract",
    "BackendContract",
}


def __getattr__(name: str) -> Any:
    if name in _CONTRACTS:
        from . import contracts  # deferred: the contract suites import pytest

        return getattr(contracts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_fake_distribution(
    root: str | Path,
    name: str,
    version: str = "0.1.0",
    entry_points: dict[str, str] | None = None,
    modules: dict[str, str] | None = None,
    group: str = "monoquant",
) -> Path:
    """Create ``<root>/<name>-<version>.dist-info`` plus module files; returns ``root``.

    Put ``root`` on ``sys.path`` (e.g. ``monkeypatch.syspath_prepend(root)``) and the
    distribution is discovered by :func:`importlib.metadata.entry_points` like a pip install.
    The ``fake_distribution`` fixture of :mod:`monoquant_core.testing.plugin` does both.

    Args:
        root: folder to write into.
        name: distribution name (e.g. ``"monoquant-example"``).
        version: distribution version.
        entry_points: entry point name -> ``"module"`` or ``"module:attr"``.
        modules: module file name without ``.py`` -> source code.
        group: entry point group (``"monoquant"``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for mod, source in (modules or {}).items():
        (root / f"{mod}.py").write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in (entry_points or {}).items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
