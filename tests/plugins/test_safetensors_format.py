from __future__ import annotations

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from safetensors import safe_open

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def test_writer_is_read_back_exactly_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):
        base = torch.randn(3, 5, generator=g) * 50
        tensors[f"t{i}"] = base > 0 if dt == torch.bool else base.to(dt)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["view"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    path = tmp_path / "x.safetensors"
    write_safetensors(str(path), tensors, {"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            back = f.get_tensor(k)
            assert back.dtype == t.dtype and torch.equal(back, t), k


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    from monoquant_core import UsageError

    with pytest.raises(UsageError, match="no safetensors equivalent"):
        write_safetensors(
            str(tmp_path / "c.safetensors"), {"c": torch.zeros(2, dtype=torch.cfloat)}, {}
        )
