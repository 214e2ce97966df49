"""options.py: component and plugin options parsed from Python values and CLI strings, with
errors that list the valid keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from monoquant_core import ComponentConfig, UsageError
from monoquant_core.options import (
    PluginOptions,
    closest,
    config_to_dict,
    did_you_mean,
    parse_options,
    split_key_values,
)


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
    assert "fix: did you mean 'mode'? use one of the valid keys" in msg


@pytest.mark.parametrize(
    "key, guess",
    [("group_sise", "group_size"), ("Group-Size", "group_size"), ("grp", None), ("xyz", None)],
)
def test_a_misspelt_key_gets_a_did_you_mean(key, guess):
    @dataclass(frozen=True)
    class GroupConfig(ComponentConfig):
        group_size: int = 128
        symmetric: bool = False

    with pytest.raises(UsageError) as e:
        parse_options(GroupConfig, {key: "1"}, "scheme 'g'")
    msg = str(e.value)
    if guess is None:
        assert "did you mean" not in msg, msg
    else:
        assert f"did you mean {guess!r}?" in msg, msg


def test_closest_ignores_case_and_never_returns_the_name_itself():
    assert closest("Int8", ["int8", "int4-group"]) == "int8"
    assert closest("int8", ["int8"]) is None
    assert closest("fp61", ["fp16", "bf16"]) == "fp16"
    assert closest(3, ["int8"]) is None
    assert did_you_mean("minmx", ["minmax", "histogram"]) == "did you mean 'minmax'? "
    assert did_you_mean("q", ["minmax"]) == ""


@pytest.mark.parametrize(
    "opts, needle",
    [
        ({"mode": "c"}, "not one of: a, b"),
        ({"flag": "maybe"}, "not a boolean"),
        ({"steps": "many"}, "not an int"),
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


def test_whole_numbers_convert_and_booleans_are_not_numbers():
    assert parse_options(DemoConfig, {"steps": 4.0, "ratio": 2}, "x") == DemoConfig(
        steps=4, ratio=2.0
    )
    with pytest.raises(UsageError, match="is True, not a number"):
        parse_options(DemoConfig, {"steps": True}, "x")


def test_a_fractional_value_for_an_int_option_is_refused():
    with pytest.raises(UsageError, match="option 'steps' is 2.5, not an int"):
        parse_options(DemoConfig, {"steps": 2.5}, "x")
    with pytest.raises(UsageError, match="option 'steps' is '2.5', not an int"):
        parse_options(DemoConfig, {"steps": "2.5"}, "x")
    assert parse_options(DemoConfig, {"steps": 4.0}, "x").steps == 4


def test_dashes_in_keys_and_config_to_dict():
    @dataclass(frozen=True)
    class Opts(PluginOptions):
        max_fraction: float = 0.01

    cfg = parse_options(Opts, {"max-fraction": "0.5", "enable": "no"}, "plugin 'p'")
    assert cfg == Opts(max_fraction=0.5, enable=False)
    assert config_to_dict(cfg) == {"version": 1, "enable": False, "max_fraction": 0.5}
    assert config_to_dict(None) == {}
