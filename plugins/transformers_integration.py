"""``transformers`` plugin: Mono Quant models inside Hugging Face transformers.

``monoquant_model_ready``: a transformers model (a ``transformers.PreTrainedModel``) that now
holds Mono Quant layers, quantized in Python (``quantize``) or loaded (``load(path, model)``),
gets transformers' quantizer for Mono Quant as its ``hf_quantizer``
(:func:`monoquant_core.hf.attach_quantizer`), as ``from_pretrained`` of a Mono Quant folder
gives it. Its own ``model.save_pretrained(out)`` then refuses in one line naming
``monoquant_core.hf.save_pretrained`` (which writes a folder transformers loads again),
instead of writing the quantized buffers under names transformers does not know and no
``quantization_config``: a folder that ``from_pretrained`` would later fill with random
weights. Any other model is left alone, and nothing is imported for it (the check reads the
model's class hierarchy, so transformers is never imported by this plugin for a model that
is not one of its own).
"""

from __future__ import annotations

from torch import nn

from monoquant_core import hookimpl

#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "transformers"


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing it)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(model).__mro__
    )


@hookimpl
def monoquant_model_ready(model: nn.Module) -> None:
    if is_transformers_model(model):
        # deferred: monoquant_core.hf imports transformers' quantizer classes on first use
        from monoquant_core import hf

        hf.attach_quantizer(model)
