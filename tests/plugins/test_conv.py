"""conv replacer: Conv1d/Conv2d keep every attribute and compute with the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monoquant_core as mq
from monoquant_core import UsageError

CONVS = {
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 9, 9)),
    "grouped": (lambda: nn.Conv2d(8, 12, 3, groups=4, bias=False), (2, 8, 9, 9)),
    "strided-dilated": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=1),
        (2, 4, 11, 13),
    ),
    "same": (lambda: nn.Conv2d(4, 6, (3, 4), dilation=(1, 2), padding="same"), (2, 4, 10, 9)),
    "valid": (lambda: nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 8, 8)),
    "reflect": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"), (2, 4, 8, 8)),
    "circular": (lambda: nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="circular"), (1, 4, 6, 7)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 5, stride=2, padding=2), (3, 6, 33)),
    "conv1d-same-replicate": (
        lambda: nn.Conv1d(6, 4, 4, padding="same", padding_mode="replicate", groups=2),
        (3, 6, 17),
    ),
}
SCHEMES = {
    "int8": {},
    "int4-group": {"group_size": 32},
    "fp16": {},
}


def _quantize_one(engine, conv, scheme="int8", options=None):
    model = nn.Sequential(conv)
    qmodel, report = engine.quantize(model, scheme=scheme, scheme_options=options or {})
    return qmodel[0], report


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_output_equals_float_conv_with_dequantized_weight(engine, kind, scheme):
    build, shape = CONVS[kind]
    torch.manual_seed(1)
    conv = build().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = conv(x)
    k = conv.weight[0].numel()
    groups = -(-k // 32)
    if scheme == "int4-group" and groups * (32 * 4 + 32) / k > 8:  # padding costs > 8 bits/w
        plan = engine.plan(
            nn.Sequential(build_copy(conv)), scheme=scheme, scheme_options=SCHEMES[scheme]
        )
        assert "padding to group_size 32" in plan.get("0").skip_reason, plan.get("0").skip_reason
        with pytest.raises(UsageError, match="nothing to quantize: the model has no layer"):
            _quantize_one(engine, build_copy(conv), scheme, SCHEMES[scheme])
        return
    q, _report = _quantize_one(engine, build_copy(conv), scheme, SCHEMES[scheme])
    assert type(q).__name__ == f"QuantizedConv{conv.weight.dim() - 2}d"
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(q, attr) == getattr(conv, attr), attr
    assert (q.groups, q.padding_mode) == (conv.groups, conv.padding_mode)
    deq = build_copy(conv)
    with torch.no_grad():
        deq.weight.copy_(q.scheme.dequantize(q.qtensor("weight")))
        want, y = deq(x), q(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.equal(y, want), f"max diff {(y - want).abs().max().item()}"
    db = mq.sqnr_db(ref, y)
    assert db > 20.0, f"{kind} {scheme} output SQNR {db:.2f} dB"


def build_copy(conv: nn.Module) -> nn.Module:
    new = type(conv)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    new.load_state_dict(conv.state_dict())
    return new.eval()


def test_int8_is_per_output_channel(engine):
    conv = nn.Conv2d(8, 8, 3, groups=8)
    q, report = _quantize_one(engine, conv)
    qt = q.qtensor("weight")
    assert qt.axis == 0 and qt.scale.shape == (8, 1) and qt.qdata.shape == (8, 9)
    db = report.layer("0.weight").sqnr_db
    assert db > 38.0, f"depthwise weight SQNR {db:.2f} dB"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_output_dtype_follows_input(engine, dtype):
    q, _ = _quantize_one(engine, nn.Conv2d(3, 5, 3, padding=1))
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        y = q(x.to(dtype))
    assert y.dtype == dtype


class SmallCNN(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.8, 1.2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(self.pool(self.conv2(h)).flatten(1))


def test_small_cnn_int8_accuracy_and_save_load(tmp_path, engine):
    x = torch.randn(4, 3, 16, 16)
    model = SmallCNN()
    with torch.no_grad():
        ref = model(x)
        qmodel, report = engine.quantize(model, scheme="int8", backend="reference")
        y = qmodel(x)
    assert {layer.name for layer in report.layers} == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert "normalisation" in dict(report.skipped)["bn"], report.skipped
    assert type(qmodel.conv1).__name__ == "QuantizedConv2d"
    db = mq.sqnr_db(ref, y)
    assert db > 30.0, f"small CNN int8 output SQNR {db:.2f} dB"

    path = tmp_path / "cnn.safetensors"
    mq.save(qmodel, str(path))
    restored = mq.load(str(path), SmallCNN(seed=7), backend="reference")
    with torch.no_grad():
        y2 = restored(x)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"

    state = mq.load(str(path), dequantize=True)
    plain = SmallCNN(seed=7)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        y3 = plain(x)
    db3 = mq.sqnr_db(ref, y3)
    assert db3 > 30.0, f"dequantized state_dict output SQNR {db3:.2f} dB"
    assert torch.allclose(y3, y, atol=1e-5), f"max diff {(y3 - y).abs().max().item()}"


def test_subclass_overriding_forward_is_kept_in_float(engine):
    class Conv2dSame(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride)

    class PlainSubclass(nn.Conv2d):
        pass

    model = nn.Sequential(Conv2dSame(3, 4, 2), PlainSubclass(4, 4, 1))
    plan = engine.plan(model)
    reason = plan.get("0").skip_reason
    assert reason and "overrides the forward of Conv2d" in reason, reason
    assert plan.get("1").selected


def test_conv_transpose_is_not_replaced(engine):
    plan = engine.plan(nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.Conv2d(4, 4, 1)))
    assert "no replacer for ConvTranspose2d" in plan.get("0").skip_reason
    assert plan.get("1").selected


def test_extra_repr(engine):
    q, _ = _quantize_one(
        engine, nn.Conv2d(4, 8, 3, padding="same", groups=2, padding_mode="reflect")
    )
    text = repr(q)
    for part in ("4, 8, kernel_size=(3, 3)", "padding='same'", "groups=2", "reflect", "int8"):
        assert part in text, text
