"""batches.py: calibration data of every accepted form normalised into ``(args, kwargs)``
batches, and a failing batch as a one-line error naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import UsageError
from monoquant_core.batches import first_line, iter_batches, model_device, run_batch, sized


def test_forms_become_args_and_kwargs():
    t = torch.ones(2, 3)
    assert [(len(a), k) for a, k in iter_batches(t)] == [(1, {})]
    ((args, kwargs),) = list(iter_batches({"x": t, "scale": 2.0}))
    assert args == () and set(kwargs) == {"x", "scale"} and kwargs["scale"] == 2.0
    batches = list(iter_batches([t, (t, 0.5), {"x": t}, [t, t]]))
    assert [len(a) for a, _ in batches] == [1, 2, 0, 2]
    assert batches[1][0][1] == 0.5 and list(batches[2][1]) == ["x"]
    gen = list(iter_batches(t for _ in range(3)))
    assert len(gen) == 3 and all(a[0] is t for a, _ in gen)


def test_tensors_move_to_the_device_and_other_values_stay():
    x = torch.ones(2, dtype=torch.float64)
    ((args, kwargs),) = list(iter_batches([{"x": x, "n": 3}], torch.device("meta")))
    assert args == () and kwargs["x"].device.type == "meta" and kwargs["n"] == 3
    ((args, _),) = list(iter_batches([(x, 2)], torch.device("meta")))
    assert args[0].device.type == "meta" and args[1] == 2


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "calibration data is a NoneType, not a tensor or batches"),
        ("x.pt", "calibration data is a str"),
        (7, "calibration data of type int is not a tensor or an iterable of batches"),
        ([], "calibration data is empty (it produced no batch)"),
        ([torch.ones(1), 3], "calibration batch 1 is a int"),
    ],
)
def test_bad_data_is_a_one_line_usage_error(data, message):
    with pytest.raises(UsageError) as e:
        list(iter_batches(data))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_iterable_that_raises_names_the_batch():
    def gen():
        yield torch.ones(1)
        raise OSError("disk vanished\nsecond line")

    with pytest.raises(UsageError) as e:
        list(iter_batches(gen()))
    assert "raised OSError while producing batch 1: disk vanished" in str(e.value)
    assert "second line" not in str(e.value)


def test_sized_model_device_and_first_line():
    assert sized(torch.ones(3)) == 1 and sized([1, 2]) == 2 and sized(iter([1])) is None
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) is None
    bn = nn.BatchNorm1d(2, affine=False)
    assert model_device(bn) == torch.device("cpu")  # buffers only
    assert first_line(ValueError("a\nb")) == "a" and first_line(KeyError()) == "KeyError"


def test_run_batch_names_the_batch_and_the_input_shapes():
    model = nn.Linear(8, 2)
    run_batch(model, (torch.ones(3, 8),), {}, 0)
    with pytest.raises(UsageError) as e:
        run_batch(model, (torch.ones(3, 7),), {}, 4)
    msg = str(e.value)
    assert msg.startswith("problem: calibration batch 4 (inputs 3x7) failed in the model: ")
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in msg and "\n" not in msg
    with pytest.raises(UsageError, match=r"batch 0 \(inputs 3x8, bool\) failed in the model: Ty"):
        run_batch(model, (torch.ones(3, 8),), {"flag": True}, 0)
