"""swap.py: replacing a submodule by name, and the bytes a model stores."""

from __future__ import annotations

import torch
from torch import nn

from monoquant_core.swap import state_bytes, swap_module


def test_swap_a_nested_module_and_the_root():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))
    new = nn.Identity()
    assert swap_module(model, "1.1", new) is model
    assert model[1][1] is new and isinstance(model[1][0], nn.ReLU)
    root = nn.Linear(2, 2)
    assert swap_module(model, "", root) is root  # the root itself is replaced


def test_state_bytes_counts_parameters_and_buffers_once():
    emb = nn.Embedding(10, 4)  # 40 float32
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: stored once
    norm = nn.BatchNorm1d(4)  # weight, bias, running mean/var (float32), num_batches (int64)
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": norm})
    assert state_bytes(model) == 40 * 4 + 4 * 4 * 4 + 8
    norm.register_buffer("codes", torch.zeros(6, dtype=torch.float16))
    assert state_bytes(model) == 40 * 4 + 4 * 4 * 4 + 8 + 12
