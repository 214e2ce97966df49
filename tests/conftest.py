from __future__ import annotations

import pytest
import torch

from monoquant_core import Engine


@pytest.fixture
def engine() -> Engine:
    """A fresh Engine with every installed plugin (real entry-point discovery)."""
    return Engine()


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("MONOQUANT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("MONOQUANT_STRICT_PLUGINS", raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
