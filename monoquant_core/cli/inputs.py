"""Reading the command line's inputs: ``--model`` factories, ``--weights`` files and
``--calibration`` data (each failure a one-line error naming the flag)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..demo import demo_inputs, demo_model
from ..errors import MonoQuantError, UsageError

__all__ = ["import_factory", "load_calibration", "load_weights", "model_from_options", "write_text"]


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
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"{flag}: {mod_name!r} has no attribute {attr!r}",
                f"name a function or class that returns {what}",
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
        return [data[k] for k in sorted(data, key=_natural)]
    return data


def _read(path: str, flag: str, not_torch: str, fix: str) -> Any:
    """The content of a ``.safetensors`` file (a dict) or of a ``torch.save`` file (loaded
    with ``weights_only=True``); a bad file is a one-line error naming ``flag``."""
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
        raise UsageError(f"{flag} {path!r} {not_torch} ({type(e).__name__})", fix) from None


def load_weights(model: nn.Module, path: str) -> None:
    """``--weights``: load a state_dict file into ``model`` (strictly)."""
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
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise UsageError(
            f"--weights {path!r} does not fit the model: {' '.join(first)}",
            "pass the weights of this --model",
        ) from None


def model_from_options(
    demo: bool, model_spec: str | None, weights: str | None
) -> tuple[nn.Module, torch.Tensor | None, str]:
    if demo and model_spec:
        raise UsageError("--demo and --model are exclusive", "pass one of them")
    if demo:
        return demo_model(), demo_inputs(), "bundled demo TinyTransformer"
    if not model_spec:
        raise UsageError("no model given", "pass --demo, or --model package.module:factory")
    built = import_factory(model_spec)()
    if not isinstance(built, nn.Module):
        raise UsageError(
            f"--model {model_spec!r} returned a {type(built).__name__}, not an nn.Module",
            "return the model from the factory",
        )
    if weights:
        load_weights(built, weights)
    return built, None, model_spec


def write_text(path: str, text: str) -> None:
    """Write ``text`` and a newline (the writer of an atomic ``--report`` file)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
