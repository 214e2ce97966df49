"""Every built-in plugin passes the contract suite of its kind, from the public kit."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from monoquant_core.testing import (
    BackendContract,
    ObserverContract,
    ReplacerContract,
    SchemeContract,
    SerializerContract,
)
from tests.helpers import Conv1D

pytest_plugins = ["monoquant_core.testing.plugin"]

# ---------------------------------------------------------------------------- schemes
# Floors: the worst weight of the tiny MLP / transformer block measures about 48 dB (int8),
# 25 dB (int4-group, g32), 73 dB (fp16) and 55 dB (bf16).


class TestInt8Contract(SchemeContract):
    scheme = "int8"
    sqnr_floor_db = 45.0


class TestInt4GroupContract(SchemeContract):
    scheme = "int4-group"
    # the tiny models' rows are 32-64 inputs long: at the default g128, padding would cost
    # more than 8 bits per weight and int4-group declines them
    scheme_options: ClassVar[dict] = {"group_size": 32}
    sqnr_floor_db = 23.0


class TestFp16Contract(SchemeContract):
    scheme = "fp16"
    sqnr_floor_db = 70.0


class TestBf16Contract(SchemeContract):
    scheme = "bf16"
    sqnr_floor_db = 52.0


# ---------------------------------------------------------------------------- observers


class TestMinMaxContract(ObserverContract):
    observer = "minmax"
    sqnr_floor_db = 45.0


class TestHistogramContract(ObserverContract):
    observer = "histogram"
    sqnr_floor_db = 45.0


# ---------------------------------------------------------------------------- replacers
# Rows of 72+ inputs, so that every built-in scheme (int4-group at g128 included) plans them.


class TestLinearContract(ReplacerContract):
    replacer = "linear"
    sqnr_floor_db = 40.0

    def build(self):
        return nn.Linear(96, 48)

    def example_input(self):
        return torch.randn(2, 5, 96)


class TestConv2dContract(ReplacerContract):
    replacer = "conv"
    sqnr_floor_db = 40.0

    def build(self):
        return nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")

    def example_input(self):
        return torch.randn(2, 8, 9, 9)


class TestConv1dContract(ReplacerContract):
    replacer = "conv"
    sqnr_floor_db = 40.0

    def build(self):
        return nn.Conv1d(48, 12, 5, padding="same", groups=3)

    def example_input(self):
        return torch.randn(3, 48, 20)


class TestEmbeddingContract(ReplacerContract):
    replacer = "embedding"
    sqnr_floor_db = 40.0

    def build(self):
        return nn.Embedding(50, 96, padding_idx=0)

    def example_input(self):
        return torch.randint(0, 50, (3, 7))


class TestGpt2Conv1DContract(ReplacerContract):
    replacer = "gpt2-conv1d"
    sqnr_floor_db = 40.0

    def build(self):
        return Conv1D(48, 96, bias_std=0.01)

    def example_input(self):
        return torch.randn(2, 5, 96)


# ---------------------------------------------------------------------------- formats


class TestSafetensorsContract(SerializerContract):
    serializer = "safetensors"


class TestCompressedTensorsContract(SerializerContract):
    serializer = "compressed-tensors"


# ---------------------------------------------------------------------------- backends


class TestReferenceContract(BackendContract):
    backend = "reference"
    sqnr_floor_db = 100.0  # it is the ground truth: equal up to float32 summation order


class TestTorchCpuContract(BackendContract):
    backend = "torch-cpu"
    sqnr_floor_db = 30.0  # bfloat16 activations on the int8 / int4 kernels


class TestTorchCudaContract(BackendContract):
    backend = "torch-cuda"
    sqnr_floor_db = 30.0  # bfloat16 activations on tinygemm; kernel tests skip without a GPU


class TestCpuVnniContract(BackendContract):
    backend = "cpu-vnni"
    sqnr_floor_db = 80.0  # the reference's int8 codes and integer dot products: float rounding only
    cases = tuple(
        ("int4-group", {"group_size": gs, "activations": "dynamic", **extra})
        for gs in (32, 64, 128, 256)
        for extra in ({}, {"symmetric": True})
    )
    shapes = ((48, 256), (37, 512))
