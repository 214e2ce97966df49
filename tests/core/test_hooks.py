"""hooks.py: calling hooks plugin by plugin (in pluggy's order, each result attributed) and
through pluggy with wrappers (a failure names the plugin whose code raised)."""

from __future__ import annotations

import pluggy
import pytest

import monoquant_core.hookspecs as specs
from monoquant_core import PluginError, UsageError, hookimpl
from monoquant_core.hooks import call_each, call_hook, plugin_error


def _pm(*plugins: tuple[str, object]) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("monoquant")
    pm.add_hookspecs(specs)
    for name, obj in plugins:
        pm.register(obj, name=name)
    return pm


class Reporter:
    def __init__(self, log, tag, fail=None):
        self.log, self.tag, self.fail = log, tag, fail

    @hookimpl
    def monoquant_report(self, report, run):
        self.log.append(self.tag)
        if self.fail is not None:
            raise self.fail
        return f"{self.tag}:{report}"


class First(Reporter):
    @hookimpl(tryfirst=True)
    def monoquant_report(self, report, run):
        return super().monoquant_report(report, run)


class Last(Reporter):
    @hookimpl(trylast=True)
    def monoquant_report(self, report, run):
        return super().monoquant_report(report, run)


def test_call_each_runs_every_plugin_in_pluggys_order_and_attributes_results():
    log: list[str] = []
    pm = _pm(
        ("a", Reporter(log, "a")),
        ("b", Reporter(log, "b")),
        ("late", Last(log, "late")),
        ("early", First(log, "early")),
    )
    out = call_each(pm, "monoquant_report", report="R", run=None)
    # tryfirst, then the last registered first, then trylast (what pluggy itself does)
    assert out == [("early", "early:R"), ("b", "b:R"), ("a", "a:R"), ("late", "late:R")]
    assert log == ["early", "b", "a", "late"]
    assert pm.hook.monoquant_report(report="R", run=None) == [r for _, r in out]


def test_implementations_receive_only_the_arguments_they_name():
    seen = []

    class Narrow:
        @hookimpl
        def monoquant_report(self, report):
            seen.append(report)

    assert call_each(_pm(("narrow", Narrow())), "monoquant_report", report=1, run=2) == [
        ("narrow", None)
    ]
    assert seen == [1]


def test_a_failure_names_exactly_its_plugin_and_stops_the_call():
    log: list[str] = []
    pm = _pm(
        ("after", Reporter(log, "after")),
        ("broken", Reporter(log, "broken", ZeroDivisionError("divided by zero"))),
        ("before", Reporter(log, "before")),
    )
    with pytest.raises(PluginError) as e:
        call_each(pm, "monoquant_report", report="R", run=None)
    msg = str(e.value)
    assert msg.startswith(
        "problem: plugin 'broken' raised ZeroDivisionError in monoquant_report: divided by zero"
    )
    assert "MONOQUANT_DISABLE_PLUGINS=broken" in msg
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert log == ["before", "broken"]


def test_a_plugins_own_user_error_passes_through_unchanged():
    err = UsageError("threshold must be positive", "pass threshold=6")
    pm = _pm(("strict", Reporter([], "strict", err)))
    with pytest.raises(UsageError) as e:
        call_each(pm, "monoquant_report", report="R", run=None)
    assert e.value is err
    with pytest.raises(UsageError) as e:
        call_hook(pm, "monoquant_report", report="R", run=None)
    assert e.value is err


class Inner:
    def __init__(self, result=None, fail=None):
        self.result, self.fail = result, fail

    @hookimpl
    def monoquant_quantize_weights(self, entry, module, run):
        if self.fail is not None:
            raise self.fail
        return self.result


class Wrapper:
    def __init__(self, log, fail_after=False):
        self.log, self.fail_after = log, fail_after

    @hookimpl(wrapper=True)
    def monoquant_quantize_weights(self, entry, module, run):
        self.log.append("before")
        result = yield
        self.log.append("after")
        if self.fail_after:
            raise KeyError("lost the result")
        return ("wrapped", result)


KW = {"entry": "e", "module": "m", "run": None}


def test_call_hook_is_firstresult_through_the_wrappers():
    log: list[str] = []
    pm = _pm(
        ("fallback", Inner("fallback")),
        ("deferring", Inner(None)),
        ("wrap", Wrapper(log)),
    )
    assert call_hook(pm, "monoquant_quantize_weights", **KW) == ("wrapped", "fallback")
    assert log == ["before", "after"]


def test_call_hook_names_the_inner_plugin_when_it_raises_under_a_wrapper():
    log: list[str] = []
    pm = _pm(("solver", Inner(fail=RuntimeError("singular matrix"))), ("wrap", Wrapper(log)))
    with pytest.raises(PluginError) as e:
        call_hook(pm, "monoquant_quantize_weights", **KW)
    assert str(e.value).startswith(
        "problem: plugin 'solver' raised RuntimeError in monoquant_quantize_weights: singular"
    )
    assert log == ["before"]


def test_call_hook_names_the_wrapper_when_the_wrapper_raises():
    pm = _pm(("solver", Inner("ok")), ("wrap", Wrapper([], fail_after=True)))
    with pytest.raises(PluginError) as e:
        call_hook(pm, "monoquant_quantize_weights", **KW)
    msg = str(e.value)
    assert "plugin 'wrap' raised KeyError in monoquant_quantize_weights" in msg
    assert "MONOQUANT_DISABLE_PLUGINS=wrap" in msg


def test_plugin_error_without_a_known_plugin():
    err = plugin_error(None, "monoquant_report", ValueError("x"), " for 'fc'")
    assert str(err) == (
        "problem: a plugin raised ValueError in monoquant_report for 'fc': x fix: report it to "
        "the plugin's authors, or disable it with MONOQUANT_DISABLE_PLUGINS=<plugin name>"
    )
