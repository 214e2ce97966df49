"""Reading the command line's inputs: ``--model`` factories, ``--weights`` files and
``--calibration`` data (each failure a one-line error naming the flag)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..batches import iter_batches
from ..demo import demo_inputs, demo_model
from ..errors import MonoQuantError, UsageError
from ..options import closest

__all__ = [
    "ModelInput",
    "apply_weights",
    "import_factory",
    "load_calibration",
    "load_weights",
    "model_from_options",
    "model_input",
    "read_weights",
    "write_text",
]


def import_factory(spec: str, flag: str = "--model", what: str = "the model") -> Callable[[], Any]:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        kind, example = ("factory", "build_model") if flag == "--model" else ("function", "batches")
        raise UsageError(
            f"{flag} {spec!r} is not 'package.module:{kind}'",
            f"write e.g. {flag} mypkg.models:{example}",
        )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(
            f"{flag}: cannot import {mod_name!r} ({e})",
            "install the package or run from the folder that contains it",
        ) from e
    finally:
        sys.path.pop(0)
    obj = module
    parts = attr.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            where = mod_name if i == 0 else f"{mod_name}:{'.'.join(parts[:i])}"
            hit = closest(part, [n for n in dir(obj) if not n.startswith("_")])
            hint = f"did you mean {flag} {mod_name}:{'.'.join([*parts[:i], hit])}? " if hit else ""
            raise UsageError(
                f"{flag}: {where!r} has no attribute {part!r}",
                f"{hint}name a function or class that returns {what}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(
            f"{flag}: {spec!r} is not callable", f"name a function that returns {what}"
        )
    return obj


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def load_calibration(spec: str) -> Any:
    """``--calibration``: a .pt / .safetensors file, or ``pkg.module:function`` (a callable
    returning an iterable of batches)."""
    if not os.path.exists(spec) and ":" in spec and not spec.endswith((".pt", ".safetensors")):
        fn = import_factory(spec, "--calibration", "an iterable of batches")
        try:
            return fn()
        except MonoQuantError:
            raise
        except Exception as e:
            raise UsageError(
                f"--calibration {spec!r} raised {type(e).__name__}: {e}",
                "fix the function; it must return an iterable of batches (a generator is fine)",
            ) from e
    if not os.path.isfile(spec):
        raise UsageError(
            f"--calibration file {spec!r} does not exist",
            "give a .pt or .safetensors file, or a package.module:function that yields batches",
        )
    data = _read(
        spec,
        "--calibration",
        "is not loadable with torch.load(weights_only=True)",
        "save a tensor or a list of tensors / tuples / dicts with torch.save, or use .safetensors",
    )
    if spec.endswith(".safetensors"):
        data = [data[k] for k in sorted(data, key=_natural)]
    try:  # the batches' types, checked before any model is built (data in memory: no cost)
        for _ in iter_batches(data):
            pass
    except UsageError as e:
        raise UsageError(f"--calibration {spec!r}: {e.problem}", e.fix) from None
    return data


def _read(path: str, flag: str, not_torch: str, fix: str) -> Any:
    """The content of a ``.safetensors`` file (a dict) or of a ``torch.save`` file (loaded
    with ``weights_only=True``); a bad file is a one-line error naming ``flag`` (and the class
    that ``weights_only`` refused, when that was the cause)."""
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise UsageError(
                f"{flag} {path!r} is not a valid safetensors file ({e})", "check the file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:
            raise UsageError(f"{flag} {path!r} {not_torch} ({type(e).__name__})", fix) from None
        cls = refused.group(1)
        if cls.rpartition(".")[2] == "BatchEncoding":
            fix = (
                "save the tokenizer's output as a plain dict: torch.save(dict(batch), path) "
                "(or a list of such dicts, one per batch)"
            )
        raise UsageError(
            f"{flag} {path!r} holds a {cls} object, which torch.load(weights_only=True) "
            "refuses (loading it would run code from the file)",
            fix,
        ) from None


#: the class ``torch.load(weights_only=True)`` refused, in its error message
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
#: names of missing / unexpected state_dict keys shown in an error (then a count)
_SHOWN_KEYS = 3


def _some(names: list[str], quote: bool = True) -> str:
    """The first few of ``names`` (quoted) and how many more."""
    shown = ", ".join(repr(n) if quote else n for n in names[:_SHOWN_KEYS])
    more = len(names) - _SHOWN_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """``--weights``: the state_dict in ``path`` (read before the model is built, so that a
    bad file fails fast)."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights file {path!r} does not exist", "check the path")
    state = _read(
        path,
        "--weights",
        "is not a plain state_dict loadable with weights_only=True",
        "save it with torch.save(model.state_dict(), path) or as .safetensors",
    )
    if not isinstance(state, dict):
        raise UsageError(
            f"--weights {path!r} holds a {type(state).__name__}, not a state_dict",
            "save model.state_dict()",
        )
    return state


def apply_weights(model: nn.Module, state: dict[str, Any], path: str) -> None:
    """Load ``state`` (read from ``path``) into ``model`` strictly; missing, unexpected and
    mis-shaped keys are one line naming the first few of each and how many there are."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    if not problems:
        wrong = [
            f"{k!r} is {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.shape != expected[k].shape
        ]
        if wrong:
            problems.append(f"{len(wrong)} tensor(s) of another shape: {_some(wrong, False)}")
    if problems:
        raise UsageError(
            f"--weights {path!r} does not fit the model: {'; '.join(problems)}",
            "pass the weights of this --model",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise UsageError(
            f"--weights {path!r} does not fit the model: {' '.join(first)[:300]}",
            "pass the weights of this --model",
        ) from None


def load_weights(model: nn.Module, path: str) -> None:
    """``--weights``: load a state_dict file into ``model`` (strictly)."""
    apply_weights(model, read_weights(path), path)


@dataclass
class ModelInput:
    """Checked ``--demo`` / ``--model`` / ``--weights`` flags: the factory imported and the
    weights file found; :meth:`build` reads the weights (a bad file fails before the factory
    runs), builds the model and loads them."""

    label: str
    factory: Callable[[], Any] | None = None  # None: the demo model
    weights: str | None = None

    def build(self) -> tuple[nn.Module, torch.Tensor | None, str]:
        """``(model, sample inputs or None, label)``."""
        if self.factory is None:
            return demo_model(), demo_inputs(), self.label
        state = read_weights(self.weights) if self.weights else None
        try:
            built = self.factory()
        except MonoQuantError:
            raise
        except Exception as e:
            raise UsageError(
                f"--model {self.label!r} raised {type(e).__name__}: {e}",
                "fix the factory; it must return the nn.Module to quantize",
            ) from e
        if not isinstance(built, nn.Module):
            raise UsageError(
                f"--model {self.label!r} returned a {type(built).__name__}, not an nn.Module",
                "return the model from the factory",
            )
        if state is not None and self.weights is not None:
            apply_weights(built, state, self.weights)
        return built, None, self.label


def model_input(demo: bool, model_spec: str | None, weights: str | None) -> ModelInput:
    """Check the model flags without building the model or reading the weights: exclusive
    flags, the factory's import, that the weights file exists."""
    if demo and model_spec:
        raise UsageError("--demo and --model are exclusive", "pass one of them")
    if demo:
        if weights:
            raise UsageError(
                "--weights is for --model (the demo model has its own weights)",
                "drop --weights, or pass --model PKG.MODULE:FACTORY",
            )
        return ModelInput("bundled demo TinyTransformer")
    if not model_spec:
        raise UsageError("no model given", "pass --demo, or --model package.module:factory")
    factory = import_factory(model_spec)
    if weights and not os.path.isfile(weights):
        raise UsageError(f"--weights file {weights!r} does not exist", "check the path")
    return ModelInput(model_spec, factory, weights)


def model_from_options(
    demo: bool, model_spec: str | None, weights: str | None
) -> tuple[nn.Module, torch.Tensor | None, str]:
    """``(model, sample inputs or None, label)`` from ``--demo`` / ``--model`` / ``--weights``."""
    return model_input(demo, model_spec, weights).build()


def write_text(path: str, text: str) -> None:
    """Write ``text`` and a newline (the writer of an atomic ``--report`` file)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
