from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from monoquant_core import ComponentConfig, UsageError
from monoquant_core.options import parse_options, split_key_values


@dataclass(frozen=True)
class DemoConfig(ComponentConfig):
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    steps: int = 3
    ratio: float = 0.5
    limit: int | None = None


def test_strings_are_converted_by_annotation():
    cfg = parse_options(
        DemoConfig,
        {"mode": "b", "flag": "true", "steps": "7", "ratio": "0.25", "limit": "none"},
        "scheme 'x'",
    )
    assert cfg == DemoConfig(mode="b", flag=True, steps=7, ratio=0.25, limit=None)
    assert parse_options(DemoConfig, {"limit": "4"}, "x").limit == 4
    assert parse_options(DemoConfig, None, "x") == DemoConfig()


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UsageError) as e:
        parse_options(DemoConfig, {"modee": "a"}, "scheme 'x'")
    msg = str(e.value)
    assert "unknown option 'modee'" in msg
    assert "flag, limit, mode, ratio, steps" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "opts, needle",
    [
        ({"mode": "c"}, "not one of: a, b"),
        ({"flag": "maybe"}, "not a boolean"),
        ({"steps": "many"}, "not a int"),
        ({"version": "2"}, "unknown option 'version'"),
    ],
)
def test_bad_values_are_named(opts, needle):
    with pytest.raises(UsageError, match=needle):
        parse_options(DemoConfig, opts, "scheme 'x'")


def test_split_key_values():
    assert split_key_values(["a=1", " b = x=y "], "--scheme-opt") == {"a": "1", "b": "x=y"}
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        split_key_values(["oops"], "--scheme-opt")


# --------------------------------------------------------------------------- plugin options


def test_a_plugin_options_key_enables_the_plugin_and_enable_false_disables_it(engine):
    from monoquant_plugins.outlier import OutlierOptions

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
        "outlier": {"version": 1, "enable": True, "threshold": 3.0, "max_fraction": 0.01}
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


def test_run_options_of_a_plugin_without_options_is_a_plugin_bug(engine):
    from monoquant_core import PluginError

    with engine.run(engine.configure()) as run, pytest.raises(PluginError, match="no plugin"):
        run.options("int8")
