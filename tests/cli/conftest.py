"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest
import torch

from monoquant_core.testing import mlp


@pytest.fixture
def model_args(tmp_path):
    """``--model`` / ``--weights`` arguments for the test kit's :func:`mlp` (inputs 32 wide)."""
    weights = tmp_path / "w.pt"
    torch.save(mlp().state_dict(), weights)
    return ["--model", "monoquant_core.testing.models:mlp", "--weights", weights]
