"""config.py: building the frozen Config from user arguments (every name and option checked
before any hook runs), plugin options, and the one per-entry config resolver."""

from __future__ import annotations

import pytest
from monoquant_plugins.outlier import OutlierOptions

from monoquant_core import CapabilityError, Config, PlanEntry, UsageError
from monoquant_core.config import entry_configs
from monoquant_core.demo import demo_model


def test_defaults_are_validated_configs_and_to_dict_is_plain_data(engine):
    cfg = engine.configure(scheme="int4-group", only="blocks.*", skip=["", "lm_head"])
    assert (cfg.scheme, cfg.observer, cfg.backend) == ("int4-group", "minmax", None)
    assert cfg.only == ("blocks.*",) and cfg.skip == ("lm_head",)  # one string, empty dropped
    assert cfg.scheme_config == engine.scheme_config("int4-group")
    data = cfg.to_dict()
    assert data["scheme_config"]["group_size"] == 128
    assert data["observer_config"] == {"version": 1, "averaging_constant": None}
    assert data["plugin_options"] == {} and data["rules"] == []
    with pytest.raises(AttributeError):
        cfg.scheme = "int8"  # frozen


def test_a_plugin_options_key_enables_the_plugin_and_enable_false_disables_it(engine):
    cfg = engine.configure(plugin_options={"outlier": {}})
    assert cfg.plugin_options == {"outlier": OutlierOptions()}
    with engine.run(cfg) as run:
        assert run.options("outlier") == OutlierOptions()
        assert run.options("gptq") is None  # registered options, not named by the user
    with engine.run(engine.configure(plugin_options={"outlier": {"enable": False}})) as run:
        assert run.options("outlier") is None
    cfg = engine.configure(plugin_options={"outlier": OutlierOptions(threshold=3.0)})
    assert cfg.plugin_options["outlier"].threshold == 3.0
    assert cfg.to_dict()["plugin_options"] == {
        "outlier": {
            "version": 1,
            "enable": True,
            "threshold": 3.0,
            "max_fraction": 0.01,
            "int4": False,
        }
    }


def test_unknown_plugin_names_and_keys_are_one_line_errors_listing_the_valid_ones(engine):
    with pytest.raises(UsageError) as e:
        engine.configure(plugin_options={"no-such-plugin": {"x": 1}})
    msg = str(e.value)
    assert "plugin_options names plugin 'no-such-plugin', which is not installed" in msg
    assert "(plugins that take options: " in msg and "gptq" in msg and "outlier" in msg
    assert "\n" not in msg
    with pytest.raises(UsageError, match="plugin 'int8', which takes no options"):
        engine.configure(plugin_options={"int8": {}})
    with pytest.raises(UsageError, match=r"unknown option 'treshold' for plugin 'outlier' \("):
        engine.configure(plugin_options={"outlier": {"treshold": 6}})
    with pytest.raises(UsageError, match=r"plugin_options\['outlier'\] is a bool, not a dict"):
        engine.configure(plugin_options={"outlier": True})
    with pytest.raises(UsageError, match="plugin_options is a list, not a dict"):
        engine.configure(plugin_options=["outlier"])


def test_a_misspelt_plugin_or_option_name_gets_a_did_you_mean(engine):
    with pytest.raises(UsageError) as e:
        engine.configure(plugin_options={"outliers": {}})
    assert "which is not installed" in str(e.value)
    assert "fix: did you mean 'outlier'? check the name" in str(e.value)
    with pytest.raises(UsageError, match="did you mean 'threshold'"):
        engine.configure(plugin_options={"outlier": {"treshold": 6}})
    with pytest.raises(UsageError) as e:
        engine.configure(plugin_options={"zzzz": {}})
    assert "did you mean" not in str(e.value)


def test_bad_rules_fail_before_compute(engine):
    with pytest.raises(UsageError, match="rule 'x=int3': unknown scheme 'int3'"):
        engine.configure(rules=["x=int3"])
    with pytest.raises(CapabilityError, match="group size 7"):
        engine.configure(rules=["x=int4-group,group_size=7"])
    with pytest.raises(UsageError, match="unknown option 'bogus' for scheme 'int8'"):
        engine.configure(rules=["x=int8,bogus=1"])
    with pytest.raises(UsageError, match="matches no module"):
        engine.plan(demo_model(), rules=["lm_haed=int8"])


def test_a_rule_observer_or_backend_is_checked_too(engine):
    with pytest.raises(UsageError, match=r"rule 'x=int8,observer=hist': unknown observer 'hist'"):
        engine.configure(rules=["x=int8,observer=hist"])
    with pytest.raises(UsageError, match="rule 'x=int8,backend=tpu': unknown backend 'tpu'"):
        engine.configure(rules=["x=int8,backend=tpu"])
    with pytest.raises(UsageError, match="unknown option 'bins' for observer 'minmax'"):
        engine.configure(rules=["x=int8,observer.bins=3"])


def _entry(scheme="int8", observer="minmax", **options):
    return PlanEntry("fc", "Linear", scheme=scheme, observer=observer, options=options)


def test_entry_configs_are_the_runs_unless_the_entry_says_otherwise(engine):
    cfg = engine.configure(scheme="int8", scheme_options={"symmetric": False})
    s, o = entry_configs(cfg, _entry(), engine.schemes, engine.observers)
    assert s is cfg.scheme_config and o is cfg.observer_config
    # another scheme: its own defaults, not the run's int8 options
    s, _ = entry_configs(cfg, _entry("int4-group"), engine.schemes, engine.observers)
    assert s == engine.scheme_config("int4-group")
    # the entry's own options replace the run's (they are not merged)
    entry = _entry(scheme_options={"granularity": "per-tensor"})
    s, _ = entry_configs(cfg, entry, engine.schemes, engine.observers)
    assert (s.granularity, s.symmetric) == ("per-tensor", True)
    entry = _entry(observer="histogram", observer_options={"max_shrink": 0.5})
    _, o = entry_configs(cfg, entry, engine.schemes, engine.observers)
    assert type(o).__name__ == "HistogramConfig" and o.max_shrink == 0.5


def test_plugin_options_instance_is_taken_as_is_and_a_config_can_be_built_by_hand(engine):
    opts = OutlierOptions(threshold=2.0)
    cfg = engine.configure(plugin_options={"outlier": opts})
    assert cfg.plugin_options["outlier"] is opts
    hand = Config(scheme="int8", observer="minmax")
    assert hand.plugin_options == {} and hand.to_dict()["scheme_config"] == {}
