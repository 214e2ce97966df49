"""Hugging Face ``transformers`` integration: ``from_pretrained`` loads Mono Quant output, and
:func:`save_pretrained` writes a quantized transformers model as a folder it loads again.

``monoquant quantize HF_FOLDER -o OUT`` and :func:`save_pretrained` write ``"quantization_config":
{"quant_method": "monoquant", ...}`` into ``OUT/config.json``. Importing this module registers a
quantizer for that method with transformers' public registry (``register_quantization_config`` /
``register_quantizer``), so afterwards::

    import monoquant_core.hf  # noqa: F401  (registers "monoquant" with transformers)
    from transformers import AutoModel
    model = AutoModel.from_pretrained("OUT")  # quantized layers, Mono Quant backends

builds the model, lets transformers load its float tensors, then rebuilds every quantized
layer from the folder with :func:`monoquant_core.load` (its modules, backends and kernel
layouts) and checks that every tensor of the folder was used. ``register()`` does the same
explicitly and is idempotent.

Registration cannot be automatic: transformers 5 finds a quantizer only in its in-process
mappings (``transformers/quantizers/auto.py``: ``AUTO_QUANTIZATION_CONFIG_MAPPING``, filled by
``register_quantization_config``); it reads no entry points, and ``trust_remote_code`` loads
config, model and tokenizer classes, never a quantizer. Without this import,
``AutoHfQuantizer.supports_quant_method`` logs "Unknown quantization type, got monoquant ...
we will skip the quantization" and transformers builds the float model; every quantized
weight's guard (an empty tensor the serializer stores under the weight's name in
transformers folders, docs/formats.md) is then a size mismatch and transformers raises, so it
never loads random weights silently. Import this module (or call ``register()``) before
``from_pretrained``; the quantizer here expects the guards.

Saving: :func:`save_pretrained` (``config.json`` with the ``quantization_config``, the
weights in Mono Quant's format, ``generation_config.json`` and the tokenizer's files when
given), for a model loaded with ``from_pretrained`` and for a transformers model quantized in
Python alike; ``AutoModel.from_pretrained`` of the folder gives the same outputs bit for bit.
transformers' own ``model.save_pretrained`` cannot write that file (it overwrites the
quantizer's safetensors metadata with ``format = "pt"`` and writes one metadata into every
shard, while a Mono Quant file's metadata describes its own tensors), so on a model this
quantizer loaded it raises a one-line :class:`~monoquant_core.UsageError` naming
:func:`save_pretrained` before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from typing import Any

import torch
from torch import nn

from .api import load
from .artifacts import write_through
from .atomic import atomic_folder
from .engine import Engine
from .errors import UsageError
from .files import model_artifact
from .inspection import inspect_path
from .quantized_module import QuantizedModule
from .streaming import mark_hf_config

__all__ = ["QUANT_METHOD", "attach_quantizer", "register", "save_pretrained"]

#: the ``quant_method`` the ``safetensors`` serializer writes into a transformers config.json
QUANT_METHOD = "monoquant"
_registered: dict[str, Any] = {}


def register() -> None:
    """Register the ``monoquant`` quantization method with transformers (once per process)."""
    if _registered:
        return
    try:
        # deferred: transformers is an optional dependency, imported only for this integration
        from transformers.quantizers import auto as hf_auto
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as e:
        raise UsageError(
            f"the Hugging Face integration needs transformers ({e})",
            "pip install 'monoquant[hf]' (or pip install transformers)",
        ) from None

    class MonoQuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a folder written by ``monoquant quantize``."""

        def __init__(self, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

    class MonoQuantHfQuantizer(HfQuantizer):
        """Loads a Mono Quant folder: float tensors by transformers, quantized layers by
        :func:`monoquant_core.load` once transformers has built and filled the model."""

        requires_calibration = True  # pre-quantized folders only

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.folder: str | None = None
            self.quantized: dict[str, tuple[int, ...]] = {}  # name -> shape

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            # A quantized weight's guard (an empty tensor under its float name, so that
            # transformers without this quantizer raises a size mismatch): not a mismatch here.
            return param_name in self.quantized

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            files = kwargs.get("checkpoint_files") or []
            where = getattr(getattr(model, "config", None), "name_or_path", None)
            if files:
                self.folder = os.path.dirname(os.fspath(files[0]))
            elif where and os.path.isdir(where):  # transformers that pass no file list
                self.folder = os.fspath(where)
            else:
                raise UsageError(
                    "from_pretrained found no local checkpoint files for a Mono Quant model",
                    "download the folder first and pass its local path",
                )
            # The quantized layers' float weights are absent and their codes are not model
            # parameters yet: load() fills both after transformers' pass; no warnings for them.
            self.quantized = _quantized_names(self.folder)
            names = set(self.quantized)
            weights = {"^" + re.escape(n) + "$" for n in names}
            pieces = {"^" + re.escape(n) + r"\." for n in names}
            model._keys_to_ignore_on_load_missing = (
                set(model._keys_to_ignore_on_load_missing or ()) | weights
            )
            model._keys_to_ignore_on_load_unexpected = (
                set(model._keys_to_ignore_on_load_unexpected or ()) | pieces
            )
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            assert self.folder is not None
            for name, shape in self.quantized.items():  # a guard loaded in place of a weight
                mname, _, pname = name.rpartition(".")
                module = model.get_submodule(mname)
                guard = getattr(module, pname, None)
                if isinstance(guard, torch.Tensor) and guard.numel() == 0:
                    # the weight's shape, no memory (one element, zero strides): load()
                    # checks the shape and replaces the layer
                    one = torch.empty((), dtype=guard.dtype, device=guard.device)
                    setattr(module, pname, nn.Parameter(one.expand(shape), requires_grad=False))
            return load(self.folder, model)

        def is_serializable(self) -> bool:
            # Raised, not False: transformers' own refusal names neither the cause nor the fix.
            raise _save_refused()

        @property
        def is_trainable(self) -> bool:
            return False

    for fn, cls in (
        (hf_auto.register_quantization_config, MonoQuantConfig),
        (hf_auto.register_quantizer, MonoQuantHfQuantizer),
    ):
        # a ValueError: registered by another copy of this module; keep that one
        with contextlib.suppress(ValueError):
            fn(QUANT_METHOD)(cls)
    _registered["config"], _registered["quantizer"] = MonoQuantConfig, MonoQuantHfQuantizer


def attach_quantizer(model: nn.Module) -> None:
    """Give a transformers model that holds Mono Quant layers (quantized or loaded in Python)
    transformers' quantizer for Mono Quant as its ``hf_quantizer``, as ``from_pretrained`` of
    a Mono Quant folder does: its own ``save_pretrained`` then refuses in one line naming
    :func:`save_pretrained` instead of writing a folder that transformers later loads with
    random weights (the built-in ``transformers`` plugin calls this when such a model is
    quantized or loaded). A model that already has a quantizer keeps it."""
    if getattr(model, "hf_quantizer", None) is not None:
        return
    register()
    config = _registered["config"](format="monoquant-safetensors")
    model.hf_quantizer = _registered["quantizer"](config, pre_quantized=True)


def save_pretrained(
    model: nn.Module,
    out: str,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    engine: Engine | None = None,
) -> str:
    """Write a quantized transformers model as a Hugging Face folder that
    ``AutoModel.from_pretrained(out)`` (after ``import monoquant_core.hf``) and
    :func:`monoquant_core.load` load again, with bit-identical outputs.

    The folder holds ``config.json`` (the model's config with ``architectures`` set and the
    ``quantization_config`` of Mono Quant's format), ``model.safetensors`` (Mono Quant's
    format: every quantized layer's QTensors and every other tensor of the state_dict),
    ``generation_config.json`` for a model that generates, and the tokenizer's files when
    ``tokenizer`` (anything with ``save_pretrained``) is given. Written atomically: a failure
    leaves no folder.

    Args:
        model: a transformers model with Mono Quant layers (loaded by ``from_pretrained``
            from a Mono Quant folder, or quantized in Python with :func:`monoquant_core.quantize`).
        out: the folder to write.
        tokenizer: a tokenizer or processor saved into the folder too.
        overwrite: replace an existing ``out`` (default: refuse).
        engine: the Engine whose plugins write the file (default: all installed).

    Returns:
        The absolute path of the folder.

    Raises:
        UsageError: not a transformers model, a model without quantized layers, or ``out``
            exists without ``overwrite``.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "save_pretrained"):
        raise UsageError(
            f"save_pretrained() got a {type(model).__name__}, not a transformers model",
            "use monoquant_core.save(model, path) for any other nn.Module",
        )
    if not any(isinstance(m, QuantizedModule) for m in model.modules()):
        raise UsageError(
            f"the {type(model).__name__} has no quantized layer",
            "quantize it first (monoquant_core.quantize(model, ...)), or save a float model "
            "with its own save_pretrained",
        )
    dst = os.path.abspath(os.fspath(out))
    if os.path.lexists(dst) and not overwrite:
        raise UsageError(
            f"output {dst!r} already exists", "pass overwrite=True or choose another path"
        )
    eng = engine or Engine()
    art = model_artifact(eng.registries, model)
    serializer = eng.serializers.get("safetensors")
    facts = {name: qt.facts() for name, qt in art.qtensors.items()}
    cfg = copy.deepcopy(config)
    cfg.architectures = [type(model).__name__]
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats:
        cfg.dtype = str(floats[0]).replace("torch.", "")

    def build(tmp: str) -> None:
        cfg.save_pretrained(tmp)
        mark_hf_config(os.path.join(tmp, "config.json"), serializer.hf_quantization_config(facts))
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", lambda: False)
        if generation is not None and can_generate():
            generation.save_pretrained(tmp)
        writer = serializer.open_writer(os.path.join(tmp, "model.safetensors"))
        writer.for_transformers = True  # guards: transformers alone raises, never loads noise
        write_through(writer, art)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_folder(dst, build, overwrite)
    return dst


def _save_refused() -> UsageError:
    return UsageError(
        "transformers' save_pretrained cannot write a Mono Quant model (it replaces the "
        "file's metadata with its own)",
        "use monoquant_core.hf.save_pretrained(model, OUT) (tokenizer=... to add its files)",
    )


def _quantized_names(folder: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the quantized weights (``x.weight``) of a Mono Quant folder, from
    its headers; the serializer stores each under names that start with ``x.weight.`` (and,
    in format version 2, an empty guard under ``x.weight`` itself)."""
    info = inspect_path(Engine().registries, folder)
    return {t["name"]: tuple(t["shape"]) for t in info["tensors"] if t["quantized"]}


register()
