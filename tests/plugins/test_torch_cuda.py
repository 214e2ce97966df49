"""torch-cuda backend: kernel paths against the reference backend on the same QTensor (GPU
only; every test here is marked ``gpu`` and skips cleanly without CUDA), plus the CPU-side
behaviour that needs no GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import CapabilityError, Engine
from tests.helpers import rel_err

PATHS = [
    ("int8", {"activations": "dynamic"}, 2e-2),
    ("int8", {"activations": "dynamic-tensor"}, 2e-2),
    ("int8", {}, 1e-2),
    ("int4-group", {"group_size": 128}, 2e-2),
    ("int4-group", {"group_size": 32, "symmetric": True}, 2e-2),
    ("fp16", {}, 1e-2),
    ("bf16", {}, 2e-2),
]


def test_unavailable_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    engine = Engine()
    assert "no CUDA device" in str(engine.backends.get("torch-cuda").available())
    with pytest.raises(CapabilityError, match="'torch-cuda' is not available here: no CUDA"):
        engine.configure(backend="torch-cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme, opts, bound", PATHS)
@pytest.mark.parametrize("m", [1, 5, 64])
def test_cuda_kernels_match_reference(scheme, opts, bound, m):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 256))
    q, _ = Engine().quantize(base, scheme=scheme, scheme_options=opts)
    q = q.to("cuda")
    assert q[0].backend.name == "torch-cuda", q[0].backend.name
    ref = Engine().quantize(
        nn.Sequential(nn.Linear(512, 256)), scheme=scheme, scheme_options=opts, backend="reference"
    )[0]
    ref.load_state_dict(q.state_dict())
    ref = ref.to("cuda")
    ref[0].backend = Engine().backends.get("reference")
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        err = rel_err(q(x), ref(x))
    assert err < bound, f"{scheme} {opts} M={m}: relative error {err:.2e}"


@pytest.mark.gpu
def test_moving_between_devices_reselects_the_backend():
    torch.manual_seed(0)
    q, _ = Engine().quantize(nn.Sequential(nn.Linear(256, 128)), scheme="int4-group")
    x = torch.randn(3, 256)
    y_cpu = q(x)
    assert q[0].backend.name == "torch-cpu"
    q = q.to("cuda")
    assert q[0].backend.name == "torch-cuda"
    y_gpu = q(x.cuda()).cpu()
    assert rel_err(y_gpu, y_cpu) < 3e-2
    q = q.to("cpu")
    assert q[0].backend.name == "torch-cpu"


@pytest.mark.gpu
def test_unsupported_shapes_fall_back_on_cuda():
    torch.manual_seed(0)
    # K = 200: not a multiple of 64 (tinygemm) -> reference on the GPU, same numbers.
    q, _ = Engine().quantize(nn.Sequential(nn.Linear(200, 24)), scheme="int4-group")
    y_cpu = q(torch.ones(2, 200))
    q = q.to("cuda")
    assert q[0].backend.name == "reference"
    x = torch.ones(2, 200, device="cuda")
    assert rel_err(q(x).cpu(), y_cpu) < 1e-5
    assert q(x[:0]).shape == (0, 24)
    x3 = torch.randn(2, 3, 200, device="cuda")
    assert q(x3).shape == (2, 3, 24)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "int4-group"])
def test_saved_model_loads_onto_cuda(tmp_path, scheme):
    torch.manual_seed(0)
    engine = Engine()
    q, _ = engine.quantize(nn.Sequential(nn.Linear(256, 128), nn.ReLU()), scheme=scheme)
    engine.save(q, str(tmp_path / "m.safetensors"))
    x = torch.randn(4, 256)
    want = q(x)
    loaded = engine.load(
        str(tmp_path / "m.safetensors"), nn.Sequential(nn.Linear(256, 128), nn.ReLU())
    )
    loaded = loaded.to("cuda")
    assert loaded[0].backend.name == "torch-cuda"
    assert rel_err(loaded(x.cuda()).cpu(), want) < 3e-2


def test_static_int8_is_declined_by_torch_cuda_with_the_reason():
    from monoquant_core.components import WeightInfo
    from monoquant_core.qtensor import QuantSpec

    be = Engine().backends.get("torch-cuda")
    spec = QuantSpec(bits=8, symmetric=True, axis=0)
    info = WeightInfo("int8", spec, (64, 64), torch.float32, "cuda", "static")
    assert be.supports(info) == "no CUDA kernel for int8 activations='static'"


@pytest.mark.gpu
def test_static_int8_model_moved_to_cuda_runs_on_reference():
    torch.manual_seed(0)
    calib = [torch.randn(16, 256) for _ in range(4)]
    q, _ = Engine().quantize(
        nn.Sequential(nn.Linear(256, 128)),
        scheme="int8",
        scheme_options={"activations": "static"},
        calibration=calib,
        progress=False,
    )
    x = torch.randn(3, 256)
    y_cpu = q(x)
    q = q.to("cuda")
    assert q[0].backend.name == "reference"
    assert rel_err(q(x.cuda()).cpu(), y_cpu) < 2e-2
