"""errors.py: every user error renders as one ``problem: ... fix: ...`` line."""

from __future__ import annotations

import pytest

from monoquant_core.errors import (
    CapabilityError,
    FormatError,
    MonoQuantError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UsageError,
)


def test_problem_and_fix_are_one_line():
    err = UsageError("unknown scheme\n  'int3'", "choose one of:\n int8, fp16")
    assert str(err) == "problem: unknown scheme 'int3' fix: choose one of: int8, fp16"
    assert (err.problem, err.fix) == ("unknown scheme 'int3'", "choose one of: int8, fp16")
    assert str(FormatError("truncated file")) == "problem: truncated file"


@pytest.mark.parametrize(
    "cls",
    [UsageError, PluginLoadError, PluginConflictError, CapabilityError, FormatError, PluginError],
)
def test_every_error_is_a_monoquant_error(cls):
    with pytest.raises(MonoQuantError, match="^problem: x fix: y$"):
        raise cls("x", "y")
