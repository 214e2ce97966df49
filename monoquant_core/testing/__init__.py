"""Helpers for testing Mono Quant and its plugins.

* :mod:`monoquant_core.testing.models` — small seeded models (MLP, transformer block, a custom
  module wrapping Linear layers).
* :func:`make_fake_distribution` — writes an installed-looking ``dist-info`` (with entry points)
  and plugin modules into a folder, so the real entry-point discovery runs without pip.
"""

from __future__ import annotations

from pathlib import Path

from .models import CustomWrapperModel, mlp, transformer_block

__all__ = ["CustomWrapperModel", "make_fake_distribution", "mlp", "transformer_block"]


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
