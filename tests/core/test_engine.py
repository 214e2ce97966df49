"""engine.py: every verb that runs hooks is exactly one run (configure ... unconfigure, with
the Config it was given); the file verbs run none; ``configure`` validates without hooks."""

from __future__ import annotations

import pytest
import torch

from monoquant_core import CapabilityError, Config, Engine, UsageError, hookimpl
from monoquant_core.testing import mlp
from tests.helpers import small_state, write_file


class Counter:
    monoquant_plugin_name = "counter"

    def __init__(self):
        self.events: list[str] = []
        self.configs: list[Config] = []

    @hookimpl
    def monoquant_configure(self, run):
        self.events.append("configure")
        self.configs.append(run.config)

    @hookimpl
    def monoquant_unconfigure(self, run):
        self.events.append("unconfigure")


@pytest.fixture
def counted():
    counter = Counter()
    return Engine(plugins=[counter]), counter


@pytest.fixture
def files(tmp_path, counted):
    engine, counter = counted
    src = write_file(tmp_path / "in.safetensors", small_state())
    q = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(q), progress=False)
    counter.events.clear()
    counter.configs.clear()
    return src, q


def test_each_model_verb_is_one_run(counted):
    engine, counter = counted
    verbs = {
        "plan": lambda: engine.plan(mlp()),
        "quantize": lambda: engine.quantize(mlp(), progress=False),
        "calibrate": lambda: engine.calibrate(mlp(), torch.randn(40, 32), progress=False),
        "quantize-sequential": lambda: engine.quantize(
            mlp(), calibration=torch.randn(40, 32), sequential=True, progress=False
        ),
    }
    for name, verb in verbs.items():
        counter.events.clear()
        verb()
        assert counter.events == ["configure", "unconfigure"], name


def test_each_checkpoint_verb_is_one_run_and_the_file_verbs_none(counted, files, tmp_path):
    engine, counter = counted
    src, q = files
    engine.plan_checkpoint(str(src))
    assert counter.events == ["configure", "unconfigure"]
    counter.events.clear()
    engine.quantize_checkpoint(str(src), str(tmp_path / "q2.safetensors"), progress=False)
    assert counter.events == ["configure", "unconfigure"]
    counter.events.clear()
    engine.inspect(str(q))
    engine.verify(str(src), str(q), progress=False)
    engine.dequantize_checkpoint(str(q), str(tmp_path / "plain.safetensors"), progress=False)
    qmodel, _ = Engine().quantize(mlp())
    engine.save(qmodel, str(tmp_path / "m.safetensors"))
    engine.load(str(tmp_path / "m.safetensors"), mlp())
    engine.configure(scheme="int4-group")
    assert counter.events == []


def test_a_given_config_is_the_runs_config_and_options_build_one(counted):
    engine, counter = counted
    cfg = engine.configure(scheme="int8", skip=["4"])
    plan = engine.plan(mlp(), cfg)
    assert counter.configs[-1] is cfg and plan.config is cfg
    assert [e.name for e in plan.selected] == ["0", "2"]
    _, report = engine.quantize(mlp(), scheme="fp16", only=["2"], progress=False)
    assert counter.configs[-1].scheme == "fp16" and counter.configs[-1].only == ("2",)
    assert [layer.name for layer in report.layers] == ["2.weight"]


def test_a_failed_verb_still_closes_its_run(counted):
    engine, counter = counted
    with pytest.raises(UsageError, match="--only 'nope' matches no module"):
        engine.quantize(mlp(), only=["nope"])
    assert counter.events == ["configure", "unconfigure"]


def test_configure_validates_every_name_and_option(engine):
    cfg = engine.configure(scheme="int4-group", scheme_options={"group_size": "32"})
    assert isinstance(cfg, Config) and cfg.scheme_config.group_size == 32
    with pytest.raises(UsageError, match=r"unknown scheme 'int3' \(available: .*int8"):
        engine.configure(scheme="int3")
    with pytest.raises(UsageError, match=r"unknown observer 'hist' \(available: histogram, "):
        engine.configure(observer="hist")
    with pytest.raises(UsageError, match="unknown option 'group' for scheme 'int4-group'"):
        engine.configure(scheme="int4-group", scheme_options={"group": 32})
    with pytest.raises(UsageError, match="unknown option 'bins' for observer 'minmax'"):
        engine.configure(observer_options={"bins": 8})
    with pytest.raises(UsageError, match=r"rule 'x=int3': unknown scheme"):
        engine.configure(rules=["x=int3"])
    if not torch.cuda.is_available():
        with pytest.raises(CapabilityError, match="'torch-cuda' is not available here"):
            engine.configure(backend="torch-cuda")


def test_config_and_keyword_options_together_are_refused(engine):
    from monoquant_core import UsageError
    from monoquant_core.testing import mlp

    cfg = engine.configure(scheme="int8")
    with pytest.raises(UsageError, match=r"both config= and keyword options \(scheme\)"):
        engine.quantize(mlp(), config=cfg, scheme="int4-group")
    with pytest.raises(UsageError, match="not both"):
        engine.plan(mlp(), cfg, skip=["0"])
