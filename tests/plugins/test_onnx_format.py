"""ONNX export, run by onnxruntime: int4-group Linear layers as MatMulNBits and int8 weights as
DequantizeLinear give the reference backend's outputs; what ONNX export cannot hold is refused
in one line with nothing written. Skipped without the ``onnx`` extra (CI installs it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import Engine, UsageError, load

ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnxruntime)")
onnx = pytest.importorskip("onnx", reason="needs the onnx extra (onnx)")
pytest.importorskip("onnxscript", reason="needs the onnx extra (onnxscript)")

# torch.onnx's exporter takes about 30 s to load and trace on its first use, and every test
# here exports: the module runs in .ci/run's slow set (python -m pytest -m slow)
pytestmark = pytest.mark.slow


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 96, bias=False)
        self.c = nn.Linear(96, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _run(path, x, accuracy_level: str | None = None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _export(tmp_path, scheme, opts, x):
    q, _ = Engine().quantize(Net(), scheme=scheme, scheme_options=opts)
    src = tmp_path / "q.safetensors"
    Engine().save(q, str(src))
    out = tmp_path / "m.onnx"
    counts = Engine().export(str(src), str(out), "onnx", model=Net(), example_inputs=x)
    ref = load(str(src), Net(), backend="reference")
    with torch.no_grad():
        want = ref(x)
    return out, counts, want


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "opts",
    [{"group_size": 32}, {"group_size": 64, "symmetric": True}, {"zero": "int", "method": "rtn"}],
    ids=["asym-float-zero-g32", "sym-g64", "int-zero-g128"],
)
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)], ids=["gemm", "matmul"])
def test_int4_layers_run_as_matmulnbits_with_mono_quants_numbers(tmp_path, opts, shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    path, counts, want = _export(tmp_path, "int4-group", opts, x)
    n = Engine().inspect(str(tmp_path / "q.safetensors"))["totals"]["quantized"]
    assert n >= 2 and counts == {"int8": 0, "int4": n}  # g128 leaves the K=64 layer in float
    ops = [nd.op_type for nd in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == n
    got = _run(path, x)
    assert got.shape == want.shape and _rel(got, want) < 1e-5  # same weights, float math
    got2 = _run(path, torch.randn(*shape))  # another input of the traced shape runs too
    assert torch.isfinite(got2).all()


@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
def test_int8_weights_dequantize_linear(tmp_path, granularity):
    torch.manual_seed(2)
    x = torch.randn(6, 64)
    path, counts, want = _export(tmp_path, "int8", {"granularity": granularity}, x)
    assert counts == {"int8": 3, "int4": 0}
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("DequantizeLinear") == 3
    assert _rel(_run(path, x, accuracy_level="0"), want) < 1e-5  # weight-only numerics
    # onnxruntime's default fuses DequantizeLinear + MatMul into 8-bit MatMulNBits with int8
    # inputs (accuracy level 4): the W8A8 error, documented in docs/deploy.md
    assert _rel(_run(path, x), want) < 3e-2


def test_what_onnx_cannot_hold_is_refused_and_nothing_written(tmp_path, cli):
    q, _ = Engine().quantize(Net(), scheme="int8", scheme_options={"activations": "dynamic"})
    src, out = tmp_path / "q.safetensors", tmp_path / "m.onnx"
    Engine().save(q, str(src))
    with pytest.raises(UsageError, match="run-time input quantization"):
        Engine().export(str(src), str(out), "onnx", model=Net(), example_inputs=torch.randn(2, 64))
    assert not out.exists()
    with pytest.raises(UsageError, match="needs the model"):
        Engine().export(str(src), str(out), "onnx")
    with pytest.raises(UsageError, match="needs both the model and an example input"):
        Engine().export(str(src), str(out), "onnx", model=Net())
    with pytest.raises(UsageError, match="needs the model's graph"):
        Engine().save(q, str(tmp_path / "x.onnx"), serializer="onnx")
    assert not (tmp_path / "x.onnx").exists()
    res = cli("export", src, "-o", out, "--format", "onnx", "--demo")
    assert res.exit_code == 1 and "monoquant: problem:" in res.output and not out.exists()
    res = cli("export", src, "-o", out, "--format", "compressed-tensors", "--demo")
    assert res.exit_code == 1 and "for graph formats" in res.output


def test_cli_exports_the_demo_model(tmp_path, cli):
    src, out = tmp_path / "q4.safetensors", tmp_path / "demo.onnx"
    assert cli("quantize", "--demo", "-o", src, "--scheme", "int4-group", "-q").exit_code == 0
    res = cli("export", src, "-o", out, "--format", "onnx", "--demo")
    assert res.exit_code == 0, res.output
    assert "25 int4" in res.output and out.exists()
    from monoquant_core.demo import demo_inputs, demo_model

    x = demo_inputs(seed=5)
    with torch.no_grad():
        want = load(str(src), demo_model(), backend="reference")(x)
    assert _rel(_run(out, x), want) < 1e-5


@pytest.mark.parametrize("scheme, opts", [("int4-group", {"group_size": 32}), ("int8", {})])
def test_the_export_takes_other_batch_sizes_and_lengths(tmp_path, scheme, opts):
    """Traced at (2, 7, 64), the graph runs at other leading dimensions (dynamic axes where the
    model allows them) with the reference backend's outputs."""
    out, _, _ = _export(tmp_path, scheme, opts, torch.randn(2, 7, 64))
    ref = load(str(tmp_path / "q.safetensors"), Net(), backend="reference")
    _runs_like(out, ref, ((5, 11, 64), (1, 1, 64)))


def _runs_like(path, ref, shapes) -> None:
    """onnxruntime (weight-only numerics) gives ``ref``'s outputs at every input shape."""
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = ref(x)
        assert _rel(_run(path, x, "0"), want) < 1e-5, shape


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_a_conv2d_model_exports_and_runs_in_onnxruntime(tmp_path):
    """int8 Conv2d weights become DequantizeLinear feeding onnxruntime's Conv; the outputs are
    the reference backend's (other image sizes and batch sizes too)."""
    q, _ = Engine().quantize(ConvNet(), scheme="int8")
    assert type(q.conv).__name__.startswith("Quantized")
    src, out = tmp_path / "cnn.safetensors", tmp_path / "cnn.onnx"
    Engine().save(q, str(src))
    counts = Engine().export(str(src), str(out), "onnx", model=ConvNet(),
                             example_inputs=torch.randn(2, 3, 16, 16))  # fmt: skip
    assert counts, counts
    ref = load(str(src), ConvNet(), backend="reference")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DequantizeLinear", "Conv"} <= ops
    _runs_like(out, ref, ((2, 3, 16, 16), (4, 3, 24, 20)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # a Python branch on a tensor's value: torch.export cannot
            return self.lin(x)
        return -self.lin(x)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.inner = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.a(x))


def test_a_model_the_exporter_cannot_trace_is_named_in_one_line(tmp_path, cli):
    q, _ = Engine().quantize(Untraceable(), scheme="int8")
    src, out = tmp_path / "u.safetensors", tmp_path / "u.onnx"
    Engine().save(q, str(src))
    with pytest.raises(UsageError) as err:
        Engine().export(str(src), str(out), "onnx", model=Untraceable(),
                        example_inputs=torch.randn(2, 64))  # fmt: skip
    msg = str(err.value)
    assert "could not trace the model in module 'inner' (_Branchy)" in msg, msg
    assert "\n" not in msg and "fix:" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_a_missing_onnx_package_names_the_install(tmp_path, monkeypatch):
    src = tmp_path / "q.safetensors"
    Engine().save(Engine().quantize(Net(), scheme="int8")[0], str(src))
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(UsageError, match=r"needs the onnx package.*pip install"):
        Engine().export(str(src), str(tmp_path / "m.onnx"), "onnx", model=Net(),
                        example_inputs=torch.randn(2, 64))  # fmt: skip
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # two exports of the demo model (~5 s)
def test_an_existing_output_needs_overwrite_and_an_interrupted_export_writes_nothing(
    tmp_path, cli, monkeypatch
):
    src, out = tmp_path / "q4.safetensors", tmp_path / "demo.onnx"
    assert cli("quantize", "--demo", "-o", src, "--scheme", "int4-group", "-q").exit_code == 0
    out.write_bytes(b"keep me")
    res = cli("export", src, "-o", out, "--format", "onnx", "--demo")
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert out.read_bytes() == b"keep me"

    def half_then_interrupted(proto, path, *a, **k):
        with open(path, "wb") as f:
            f.write(proto.SerializeToString()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        Engine().export(str(src), str(out), "onnx", overwrite=True, model=_demo(),
                        example_inputs=_demo_x())  # fmt: skip
    assert out.read_bytes() == b"keep me"  # the old file stays, no partial one replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.onnx", "q4.safetensors"]
    monkeypatch.undo()
    res = cli("export", src, "-o", out, "--format", "onnx", "--demo", "--overwrite")
    assert res.exit_code == 0, res.output
    assert onnx.load(str(out)).graph.node


def _demo():
    from monoquant_core.demo import demo_model

    return demo_model()


def _demo_x():
    from monoquant_core.demo import demo_inputs

    return demo_inputs(seed=1)
