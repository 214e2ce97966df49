"""Hugging Face ``transformers`` integration: ``from_pretrained`` loads Mono Quant output.

``monoquant quantize HF_FOLDER -o OUT`` writes ``"quantization_config": {"quant_method":
"monoquant", ...}`` into ``OUT/config.json``. Importing this module registers a quantizer for
that method with transformers' public registry (``register_quantization_config`` /
``register_quantizer``), so afterwards::

    import monoquant_core.hf  # noqa: F401  (registers "monoquant" with transformers)
    from transformers import AutoModel
    model = AutoModel.from_pretrained("OUT")  # quantized layers, Mono Quant backends

builds the model, lets transformers load its float tensors, then rebuilds every quantized
layer from the folder with :func:`monoquant_core.load` (its modules, backends and kernel
layouts) and checks that every tensor of the folder was used. ``register()`` does the same
explicitly and is idempotent. Without this import transformers only warns about the unknown
method and leaves the quantized layers randomly initialised, which this integration cannot
prevent from outside transformers: import it (or ``monoquant_core.hf.register()``) first.

Writing a loaded model back with ``save_pretrained`` is refused by transformers (the quantizer
says it is not serializable): save it with :func:`monoquant_core.save`, or quantize the float
folder again.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from .errors import UsageError

__all__ = ["QUANT_METHOD", "register"]

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
            names = _quantized_names(self.folder)
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
            from .api import load  # deferred: the verbs import the whole stack

            assert self.folder is not None
            return load(self.folder, model)

        def is_serializable(self) -> bool:
            return False

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


def _quantized_names(folder: str) -> set[str]:
    """Names of the quantized weights (``x.weight``) of a Mono Quant folder, from its headers;
    the serializer stores each under names that start with ``x.weight.``."""
    from .engine import Engine  # deferred: the verbs import the whole stack
    from .inspection import inspect_path  # deferred: needed only once a model loads

    info = inspect_path(Engine().registries, folder)
    return {t["name"] for t in info["tensors"] if t["quantized"]}


register()
