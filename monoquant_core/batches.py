"""Calibration data as batches, and running one batch through a model.

``data`` may be a tensor (one batch), a dict (one batch of keyword inputs), or any iterable of
batches (a list, a generator, a ``DataLoader``): each batch is a tensor (``model(x)``), a tuple
or list (``model(*batch)``) or a dict (``model(**batch)``). Tensors are moved to the model's
device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import MonoQuantError, UsageError

__all__ = [
    "Batch",
    "Materialized",
    "first_line",
    "iter_batches",
    "model_device",
    "run_batch",
    "sized",
]

Batch = tuple[tuple[Any, ...], dict[str, Any]]

_BATCH_FIX = (
    "give a tensor, or an iterable whose batches are tensors (model(x)), tuples "
    "(model(*batch)) or dicts (model(**batch))"
)


class Materialized(list):
    """Calibration batches held in memory (sequential mode runs them once per layer)."""


def sized(data: Any) -> int | None:
    """The number of batches in ``data`` when it is known without iterating."""
    if isinstance(data, torch.Tensor):
        return 1
    try:
        return len(data)
    except TypeError:
        return None


def iter_batches(data: Any, device: torch.device | None = None) -> Iterator[Batch]:
    """Normalise calibration ``data`` into ``(args, kwargs)`` batches (see the module doc).

    Raises:
        UsageError: ``data`` is not a tensor / iterable, a batch has an unsupported type, the
            iterable raised while producing a batch, or it produced no batch at all.
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        yield _batch(data, 0, device)
        return
    if data is None or isinstance(data, (str, bytes)):
        raise UsageError(
            f"calibration data is a {type(data).__name__}, not a tensor or batches", _BATCH_FIX
        )
    try:
        it = iter(data)
    except TypeError:
        raise UsageError(
            f"calibration data of type {type(data).__name__} is not a tensor or an iterable "
            "of batches",
            _BATCH_FIX,
        ) from None
    i = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except MonoQuantError:
            raise
        except Exception as e:
            raise UsageError(
                f"calibration data raised {type(e).__name__} while producing batch {i}: "
                f"{first_line(e)}",
                "fix the data source; nothing was quantized and the model is unchanged",
            ) from e
        yield _batch(item, i, device)
        i += 1
    if i == 0:
        raise UsageError(
            "calibration data is empty (it produced no batch)",
            "pass at least one batch of model inputs (a few hundred rows is typical)",
        )


def _batch(item: Any, i: int, device: torch.device | None) -> Batch:
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) and device is not None else v

    if isinstance(item, torch.Tensor):
        return (move(item),), {}
    if isinstance(item, (tuple, list)):
        return tuple(move(v) for v in item), {}
    if isinstance(item, Mapping):
        return (), {str(k): move(v) for k, v in item.items()}
    raise UsageError(f"calibration batch {i} is a {type(item).__name__}", _BATCH_FIX)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def run_batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> None:
    """``model(*args, **kwargs)``; a failure becomes a one-line error naming batch ``i``.

    A :class:`~monoquant_core.errors.MonoQuantError` raised inside the forward (e.g. by a
    collector, already naming its plugin) passes through unchanged.
    """
    try:
        model(*args, **kwargs)
    except MonoQuantError:
        raise
    except Exception as e:
        shapes = ", ".join(
            "x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
            for v in [*args, *kwargs.values()]
        )
        raise UsageError(
            f"calibration batch {i} (inputs {shapes or 'none'}) failed in the model: "
            f"{type(e).__name__}: {first_line(e)}",
            "give batches shaped like the model's inputs; nothing was quantized and the model "
            "is unchanged",
        ) from e
