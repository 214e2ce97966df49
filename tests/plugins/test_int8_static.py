"""int8 activations="static": calibrated per-tensor uint8 inputs (minmax, moving average,
histogram), run by the reference (ground truth) and torch-cpu (fbgemm), saved and loaded."""

from __future__ import annotations

import warnings

import pytest
import torch
from monoquant_plugins.backends.fbgemm_probe import fbgemm_reduce_range

from monoquant_core import Engine, FormatError, sqnr_db
from monoquant_core.activations import fake_quantize_static
from monoquant_core.testing import mlp
from monoquant_core.testing.models import activation_batches, activation_transformer

STATIC = {"activations": "static"}


@pytest.fixture(scope="module")
def data():
    return activation_batches(16, seed=1), activation_batches(4, seed=2)


@pytest.fixture(scope="module")
def output_sqnr(data):
    """``(outliers, observer, **observer_options) -> (output SQNR in dB, quantized model)`` of
    the activation transformer with static int8 inputs, each computed once per module (the
    tests only read the models)."""
    calib, test = data
    engine = Engine()
    cache = {}

    def run(outliers, observer, **observer_options):
        key = (outliers, observer, tuple(sorted(observer_options.items())))
        if key not in cache:
            model = activation_transformer(outliers=outliers)
            with torch.no_grad():
                ref = torch.cat([model(x) for x in test])
                qmodel, _ = engine.quantize(
                    model,
                    scheme="int8",
                    scheme_options=STATIC,
                    observer=observer,
                    observer_options=observer_options,
                    calibration=calib,
                    progress=False,
                )
                out = torch.cat([qmodel(x) for x in test])
            cache[key] = sqnr_db(ref, out), qmodel
        return cache[key]

    return run


@pytest.mark.slow  # numeric, 6 s of calibration runs: run by .ci/run's slow set
def test_histogram_beats_minmax_by_1db_on_heavy_tailed_activations(output_sqnr):
    mm, _ = output_sqnr(False, "minmax")
    hist, _ = output_sqnr(False, "histogram")
    assert hist >= mm + 1.0, f"static histogram {hist:.2f} dB vs minmax {mm:.2f} dB"
    assert mm >= 38.0, f"static minmax output SQNR is {mm:.2f} dB"


@pytest.mark.slow  # numeric, 6 s of calibration runs: run by .ci/run's slow set
def test_histogram_never_collapses_a_layer_with_outlier_channels(output_sqnr, data):
    _, test = data
    inputs = {}
    model = activation_transformer(outliers=True)
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for x in test:
            model(x)
    for h in handles:
        h.remove()
    _, q_mm = output_sqnr(True, "minmax")
    _, q_hist = output_sqnr(True, "histogram")
    checked = []
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1) for t in xs])
        qt_mm = q_mm.get_submodule(name).qtensor()
        qt_h = q_hist.get_submodule(name).qtensor()
        db_mm, db_h = (
            sqnr_db(x, fake_quantize_static(x, qt_mm)),
            sqnr_db(x, fake_quantize_static(x, qt_h)),
        )
        assert db_h >= db_mm - 0.5, f"{name}: histogram {db_h:.2f} dB vs minmax {db_mm:.2f} dB"
        hi = (255 - int(qt_h.extra["act_zero_point"])) * float(qt_h.extra["act_scale"])
        if float(x.max()) > 100:  # a layer carrying the outlier channels
            checked.append(name)
            assert hi >= 0.5 * float(x.max()), f"{name}: clipped at {hi:.1f} of {x.max():.1f}"
    # the layers after a LayerNorm: q/k/v and fc1 of both blocks
    assert checked == [
        f"blocks.{b}.{layer}"
        for b in (0, 1)
        for layer in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1")
    ]


def test_moving_average_minmax_is_a_different_range(output_sqnr):
    _, q_plain = output_sqnr(False, "minmax")
    db, q_avg = output_sqnr(False, "minmax", averaging_constant=0.1)
    s_plain = q_plain.blocks[0].attn.q_proj.qtensor().extra["act_scale"]
    s_avg = q_avg.blocks[0].attn.q_proj.qtensor().extra["act_scale"]
    assert float(s_avg) < float(s_plain)
    assert db >= 40.0, f"moving-average minmax output SQNR is {db:.2f} dB"


def test_torch_cpu_runs_static_like_the_reference(engine):
    x = [torch.randn(32, 32) for _ in range(2)]
    q_ref, _ = engine.quantize(mlp(), calibration=x, backend="reference", scheme_options=STATIC)
    q_cpu, _ = engine.quantize(mlp(), calibration=x, scheme_options=STATIC)
    assert q_cpu[0].backend.name == "torch-cpu"
    # fbgemm's static kernel where its probe matches the reference; on CPUs without VNNI its
    # u8 x s8 pairs saturate and the layer runs the reference numerics (with a warning)
    exact = not fbgemm_reduce_range()
    assert q_cpu[0].prepared().kind == ("int8-static" if exact else "int8-static-ref")
    t = torch.randn(16, 32)
    ref, got = q_ref(t), q_cpu(t)
    assert sqnr_db(ref, got) >= 80.0, f"torch-cpu vs reference: {sqnr_db(ref, got):.1f} dB"
    with torch.no_grad():
        float_out = mlp()(t)
    assert sqnr_db(float_out, ref) >= 30.0


def test_static_layer_quantizes_its_input_with_the_stored_parameters(engine):
    x = torch.randn(64, 32)
    qmodel, report = engine.quantize(
        mlp(), calibration=x, backend="reference", scheme_options=STATIC
    )
    layer, qt = qmodel[0], qmodel[0].qtensor()
    assert qt.activations == "static"
    assert qt.extra["act_scale"].dtype == torch.float32
    assert qt.extra["act_zero_point"].dtype == torch.uint8
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert float(qt.extra["act_scale"]) == pytest.approx((hi - lo) / 255, rel=1e-6)
    w = qt.dequantize()
    expected = torch.nn.functional.linear(fake_quantize_static(x, qt), w, layer.bias)
    assert torch.equal(layer(x), expected)
    assert report.extra["modules"]["0"]["act_zero_point"] == int(qt.extra["act_zero_point"])


@pytest.mark.parametrize("backend", ["reference", None])
def test_static_save_load_is_bit_identical_without_calibration_data(engine, tmp_path, backend):
    calib = [torch.randn(32, 32) for _ in range(3)]
    qmodel, _ = engine.quantize(
        mlp(), calibration=calib, backend=backend, observer="histogram", scheme_options=STATIC
    )
    path = str(tmp_path / "static.safetensors")
    engine.save(qmodel, path)
    loaded = engine.load(path, mlp(), backend=backend)  # a fresh float model, no data
    assert type(loaded[0].backend) is type(qmodel[0].backend)
    for a, b in zip(qmodel.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    t = torch.randn(8, 32)
    assert torch.equal(qmodel(t), loaded(t))
    from monoquant_plugins.safetensors_format import MonoQuantReader

    with MonoQuantReader(path) as r:
        info = r.qinfo("0.weight")
    assert info["activations"] == "static"
    assert {"act_scale", "act_zero_point"} <= set(info["roles"])


def test_a_static_weight_without_its_parameters_is_refused_at_prepare(engine):
    from monoquant_plugins.backends.reference import ReferenceBackend

    qt = engine.quantize_weight(
        torch.randn(8, 16), "int8", "minmax", scheme_config=engine.scheme_config("int8", STATIC)
    )
    assert qt.activations == "static"
    with pytest.raises(FormatError, match="lacks its act_scale"):
        ReferenceBackend().prepare(qt, engine.schemes.get("int8"))


def test_static_on_conv_layers_is_skipped_with_a_reason(engine):
    from monoquant_core.testing import conv_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = engine.plan(conv_net(), scheme_options=STATIC)
    convs = [e for e in plan.entries if e.module_type.startswith("Conv")]
    assert convs and all("activations='static'" in (e.skip_reason or "") for e in convs)
