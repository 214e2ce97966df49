"""gptq.py: the plugin (options, calibration, fallbacks with their reasons, every supported
layer type, the CLI flags) on small models; the solver and the collectors have their own
modules (test_gptq_solver.py, test_gptq_hessian.py)."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from monoquant_plugins.gptq import GptqOptions, GptqWarning
from monoquant_plugins.safetensors_format import write_safetensors
from torch import nn

from monoquant_core import Engine, UsageError, sqnr_db
from monoquant_core.calibration import CalibrationWarning
from monoquant_core.demo import demo_inputs
from monoquant_core.testing.models import activation_transformer, correlated_batches
from tests.helpers import Branchy, Conv1D, same_state, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- options


def test_options_from_python_values_and_cli_strings(engine):
    cfg = engine.configure(plugin_options={"gptq": {"damp": 0.05, "block_size": "64"}})
    assert cfg.plugin_options["gptq"] == GptqOptions(damp=0.05, block_size=64)
    cfg = engine.configure(plugin_options={"gptq": GptqOptions(act_order=False)})
    assert cfg.plugin_options["gptq"].act_order is False


def test_unknown_option_lists_the_valid_keys(engine):
    with pytest.raises(UsageError, match="valid keys: act_order, block_size, damp, enable"):
        engine.configure(plugin_options={"gptq": {"dampening": 0.1}})
    with pytest.raises(UsageError, match="damp must be a positive"):
        engine.configure(plugin_options={"gptq": {"damp": 0}})


# --------------------------------------------------------------------------- integration


def hidden_states(n: int, dim: int, seed: int, batch: int = 4, tokens: int = 32):
    """Correlated heavy-tailed hidden states (fixed rotation and spectrum, seeded samples)."""
    return correlated_batches(n, dim, seed, batch, tokens)


def small_transformer():
    return activation_transformer(outliers=True, dim=128, heads=4, hidden=256, depth=2)


CALIB = hidden_states(8, 128, seed=0)
EVAL = torch.cat(hidden_states(4, 128, seed=1))


def quantize(engine, model=None, gptq=None, **kw):
    model = model if model is not None else small_transformer()
    opts = {"plugin_options": {"gptq": gptq}, "calibration": CALIB} if gptq is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.quantize(model, **{"scheme": "int4-group", "progress": False, **opts, **kw})


@functools.cache
def _reference_output():
    with torch.no_grad():
        return small_transformer()(EVAL)


def model_db(q):
    with torch.no_grad():
        return sqnr_db(_reference_output(), q(EVAL))


@pytest.fixture(scope="module")
def rtn_db():
    """Output SQNR of the int4-group model rounded to nearest (minmax): the baseline."""
    return model_db(quantize(Engine(), scheme_options={"method": "rtn"})[0])


@pytest.fixture(scope="module")
def gptq_default():
    """``(model, report)`` of int4-group GPTQ with the default options (tests only read it)."""
    return quantize(Engine(), gptq={})


def test_gptq_g128_beats_rtn_by_3db_on_a_small_transformer(engine, rtn_db, gptq_default):
    lsq_db = model_db(quantize(engine)[0])
    q, report = gptq_default
    gptq_db = model_db(q)
    assert gptq_db >= rtn_db + 3.0, f"GPTQ {gptq_db:.2f} dB vs minmax RTN {rtn_db:.2f} dB"
    assert gptq_db >= lsq_db + 3.0, f"GPTQ {gptq_db:.2f} dB vs data-free lsq {lsq_db:.2f} dB"
    info = report.extra["gptq"]
    assert {v["method"] for v in info["layers"].values()} == {"gptq"}
    # one-pass: every layer's Hessian is alive at once (q/k/v/o and fc1: 128, fc2: 256 inputs)
    assert info["hessian_peak_bytes"] == 2 * 4 * (5 * 128 * 128 + 256 * 256)
    # classic GPTQ (groups recomputed from the updated weights) also gains
    classic = model_db(quantize(engine, gptq={"act_order": False, "grid": "observer"})[0])
    assert classic >= rtn_db + 1.5, f"classic GPTQ {classic:.2f} dB vs RTN {rtn_db:.2f} dB"


def test_sequential_mode_holds_one_hessian_at_a_time(engine, rtn_db):
    q, report = quantize(engine, gptq={}, sequential=True)
    db = model_db(q)
    assert db >= rtn_db + 3.0, f"sequential GPTQ {db:.2f} dB vs RTN {rtn_db:.2f} dB"
    assert report.extra["gptq"]["hessian_peak_bytes"] == 4 * 256 * 256


def test_saved_file_is_plain_int4_group_and_loads_without_the_plugin(
    engine, tmp_path, monkeypatch, gptq_default
):
    q, _ = gptq_default
    path = str(tmp_path / "gptq.safetensors")
    engine.save(q, path)
    info = engine.inspect(path)
    text = str(info)
    assert "int4-group" in text and "'gptq'" not in str(info.get("producers", {}))
    monkeypatch.setenv("MONOQUANT_DISABLE_PLUGINS", "gptq")
    plain = Engine()
    assert "gptq" not in {p["name"] for p in plain.plugins()}
    loaded = plain.load(path, small_transformer())
    for name, mod in q.named_modules():
        if hasattr(mod, "qtensor"):
            a, b = mod.qtensor("weight"), loaded.get_submodule(name).qtensor("weight")
            assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
            assert torch.equal(a.zero_point, b.zero_point) and a.scheme == "int4-group"
    with torch.no_grad():
        assert torch.equal(q(EVAL), loaded(EVAL))


def test_no_calibration_is_a_clear_error_and_the_model_is_unchanged(engine):
    model = small_transformer()
    before = snapshot(model)
    with pytest.raises(UsageError, match="--calibration") as e:
        engine.quantize(model, scheme="int4-group", plugin_options={"gptq": {}})
    assert str(e.value).startswith("problem: GPTQ needs calibration data")
    assert all(isinstance(m, nn.Linear) for m in model.modules() if "proj" in type(m).__name__)
    assert same_state(before, model)
    assert isinstance(model.blocks[0].attn.q_proj, nn.Linear)


def test_checkpoint_mode_refuses_gptq(engine, tmp_path):
    src = tmp_path / "w.safetensors"
    write_safetensors(str(src), {"fc.weight": torch.randn(64, 128)}, {})
    with pytest.raises(UsageError, match="GPTQ needs a model"):
        engine.quantize_checkpoint(
            str(src),
            str(tmp_path / "o.safetensors"),
            scheme="int4-group",
            plugin_options={"gptq": {}},
            progress=False,
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_layer_that_saw_no_data_falls_back_with_the_reason(engine):
    torch.manual_seed(0)
    model = Branchy(128, 64)
    with (
        pytest.warns(GptqWarning, match="unused: saw no calibration data"),
        pytest.warns(CalibrationWarning, match="1 planned layer.* saw no data: 'unused'"),
    ):
        q, report = engine.quantize(
            model,
            scheme="int4-group",
            plugin_options={"gptq": {}},
            calibration=[x[..., :128] for x in CALIB],
            progress=False,
        )
    layers = report.extra["gptq"]["layers"]
    assert layers["used"]["method"] == "gptq"
    assert layers["unused"] == {"method": "default", "reason": "saw no calibration data"}
    torch.manual_seed(0)
    ref, _ = Engine().quantize(Branchy(128, 64), scheme="int4-group", progress=False)
    assert torch.equal(q.unused.qtensor("weight").qdata, ref.unused.qtensor("weight").qdata)


def test_nan_in_activations_never_reaches_the_weights(engine):
    torch.manual_seed(0)
    bad = [x[..., :128].clone() for x in CALIB]
    bad[2][0, 3, 5] = float("nan")
    with (
        pytest.warns(CalibrationWarning, match="NaN/Inf in the inputs of 'used' \\(1\\)"),
        pytest.warns(CalibrationWarning, match="saw no data: 'unused'"),
        pytest.warns(GptqWarning, match="unused: saw no calibration data"),
    ):
        q, report = engine.quantize(
            Branchy(128, 64),
            scheme="int4-group",
            plugin_options={"gptq": {}},
            calibration=bad,
            progress=False,
        )
    assert report.extra["gptq"]["layers"]["used"]["method"] == "gptq"
    assert torch.isfinite(q.used.qtensor("weight").dequantize()).all()
    # every batch broken: the layer falls back, still finite
    allbad = [torch.full((2, 4, 128), float("nan"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, report = engine.quantize(
            Branchy(128, 64),
            scheme="int4-group",
            plugin_options={"gptq": {}},
            calibration=allbad,
            progress=False,
        )
    assert report.extra["gptq"]["layers"]["used"]["method"] == "default"
    assert torch.isfinite(q.used.qtensor("weight").dequantize()).all()


def test_int8_per_channel_gptq(engine):
    rtn_db = model_db(quantize(engine, scheme="int8")[0])
    q, _ = quantize(engine, scheme="int8", gptq={})
    db = model_db(q)
    assert db >= rtn_db + 3.0, f"int8 GPTQ {db:.2f} dB vs RTN {rtn_db:.2f} dB"
    qt = q.blocks[0].mlp.fc1.qtensor("weight")
    assert qt.scheme == "int8" and qt.qdata.dtype == torch.int8 and qt.meta["gptq"]["rows"] > 0
    qt.validate()


class Mixed(nn.Module):
    """GPT-2 Conv1D, a Conv1d over the sequence and a grouped Conv2d."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(256, 128, std=0.05)
        self.conv = nn.Conv1d(256, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, groups=2)

    def forward(self, x):  # [B, T, 128]
        h = self.c_attn(x).transpose(1, 2)  # [B, 256, T]
        h = self.conv(h)  # [B, 64, T]
        return self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4).contiguous())


def test_gpt2_conv1d_and_convolutions(engine):
    calib = [x[..., :128] for x in CALIB]
    torch.manual_seed(0)
    ref_model = Mixed()
    with torch.no_grad():
        ref = ref_model(EVAL[..., :128])

    def run(gptq):
        torch.manual_seed(0)
        opts = {"plugin_options": {"gptq": {}}, "calibration": calib} if gptq else {}
        q, rep = engine.quantize(
            Mixed(),
            scheme="int4-group",
            scheme_options={"group_size": 32, "method": "rtn"},
            progress=False,
            **opts,
        )
        with torch.no_grad():
            return sqnr_db(ref, q(EVAL[..., :128])), rep

    rtn_db, _ = run(False)
    torch.manual_seed(0)
    float_model = Mixed()
    originals = {n: m for n, m in float_model.named_children()}
    before = {n: m.weight.detach().clone() for n, m in originals.items()}
    engine.quantize(
        float_model,
        scheme="int4-group",
        plugin_options={"gptq": {}},
        calibration=calib,
        progress=False,
    )
    for n, m in originals.items():  # the float modules that were replaced are untouched
        assert torch.equal(m.weight, before[n]), n
    db, rep = run(True)
    assert {v["method"] for v in rep.extra["gptq"]["layers"].values()} == {"gptq"}, rep.extra
    assert db >= rtn_db + 3.0, f"GPTQ {db:.2f} dB vs RTN {rtn_db:.2f} dB on Conv1D/conv layers"


def test_unsupported_schemes_and_modules_are_left_to_the_default(engine):
    plan = engine.plan(small_transformer(), scheme="fp16", plugin_options={"gptq": {}})
    notes = [n for e in plan.selected for n in e.notes if n.startswith("gptq")]
    assert notes and all("GPTQ supports int4-group and int8" in n for n in notes)
    _, report = engine.quantize(
        small_transformer(),
        scheme="fp16",
        plugin_options={"gptq": {}},
        calibration=CALIB,
        progress=False,
    )
    assert {v["method"] for v in report.extra["gptq"]["layers"].values()} == {"default"}
    plan = engine.plan(small_transformer(), scheme="int4-group", plugin_options={"gptq": {}})
    assert all("gptq" in e.notes for e in plan.selected)


def test_cli_flags(cli, tmp_path):
    data = tmp_path / "calib.pt"
    torch.save([demo_inputs(seed=s) for s in range(2)], str(data))
    out = tmp_path / "demo.safetensors"
    rep = tmp_path / "report.json"
    args = ["quantize", "--demo", "--scheme", "int4-group", "-o", out, "-q"]
    res = cli(*args, "--gptq")
    assert res.exit_code == 1 and "--calibration" in res.output, res.output
    res = cli(
        *args,
        "--calibration",
        data,
        "--gptq-opt",
        "damp=0.05",
        "--gptq-opt",
        "act_order=false",
        "--report",
        rep,
        "--overwrite",
    )
    assert res.exit_code == 0, res.output
    info = json.loads(rep.read_text())["extra"]["gptq"]
    assert info["config"]["damp"] == 0.05 and info["config"]["act_order"] is False
    assert "gptq" in {v["method"] for v in info["layers"].values()}
    res = cli("inspect", out)
    assert res.exit_code == 0 and "int4-group" in res.output
    res = cli(*args, "--gptq-opt", "dampening=1", "--overwrite")
    assert res.exit_code == 1 and "valid keys" in res.output
