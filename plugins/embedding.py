"""``embedding`` replacer (opt-in): ``nn.Embedding`` -> :class:`QuantizedEmbedding`.

Embeddings are kept in float unless selected with ``--only NAME`` (``default = False``): a
token table is often tied to the output head and is read row by row, so its size matters more
than its compute. The table ``[num_embeddings, embedding_dim]`` is quantized with channel axis 0:
one scale per vocabulary row for ``int8``, groups along the embedding dimension for group-wise
schemes.

A lookup never dequantizes the whole table: it gathers the selected rows of ``qdata``,
``scale``, ``zero_point`` and the scheme's per-row extras (in the canonical layout every one of
them has the vocabulary as its leading dimension, 4-bit packed rows included), and dequantizes
just those rows with the scheme's own ``dequantize``. A per-tensor table (``fp16``, ``int8``
``granularity=per-tensor``) shares its scale, and its unpacked codes are gathered row by row.
"""

from __future__ import annotations

import torch
from torch import nn

from monoquant_core import CapabilityError, QTensor, QuantizedModule, Replacer, hookimpl


def _gatherable(qt: QTensor) -> bool:
    """True if rows of ``qt`` can be taken without dequantizing the whole table."""
    return qt.axis == 0 or (qt.axis is None and qt.group_size is None and qt.bits in (8, 16))


def gather_rows(qt: QTensor, idx: torch.Tensor) -> QTensor:
    """The rows ``idx`` (1-D) of a 2-D table ``qt`` as a ``(len(idx), dim)`` QTensor.

    Tensors with the vocabulary as leading dimension are gathered; anything else a scheme
    stores (e.g. a shared codebook in ``extra``) is passed along unchanged.
    """
    rows, dim = qt.shape
    if qt.axis == 0:

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, idx) if t.dim() and t.shape[0] == rows else t

        qdata, scale = qt.qdata.index_select(0, idx), qt.scale.index_select(0, idx)
        zero = None if qt.zero_point is None else qt.zero_point.index_select(0, idx)
        extra = {k: take(v) for k, v in qt.extra.items()}
    else:  # per-tensor, unpacked codes: the flat codes are the table in row-major order
        qdata = qt.qdata.reshape(rows, dim).index_select(0, idx).reshape(1, -1)
        scale, zero, extra = qt.scale, qt.zero_point, dict(qt.extra)
    return QTensor(
        qdata=qdata,
        scale=scale,
        zero_point=zero,
        bits=qt.bits,
        group_size=qt.group_size,
        axis=qt.axis,
        shape=(idx.numel(), dim),
        dtype=qt.dtype,
        scheme=qt.scheme,
        extra=extra,
        meta=qt.meta,
    )


class QuantizedEmbedding(QuantizedModule):
    """Drop-in ``nn.Embedding`` with a quantized table; output dtype = the table's dtype.

    Keeps ``num_embeddings``, ``embedding_dim``, ``padding_idx``, ``norm_type``,
    ``scale_grad_by_freq`` and ``sparse`` (``max_norm`` must be None: it renormalises rows in
    place, which a quantized table cannot do).
    """

    def __init__(self, emb: nn.Embedding, qweight: QTensor, backend, scheme):
        super().__init__(backend, scheme)
        self.num_embeddings = emb.num_embeddings
        self.embedding_dim = emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.max_norm = emb.max_norm
        self.norm_type = emb.norm_type
        self.scale_grad_by_freq = emb.scale_grad_by_freq
        self.sparse = emb.sparse
        self.set_qtensor("weight", qweight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        qt = self.qtensor("weight")
        idx = input.reshape(-1)
        if idx.numel() == 0:
            return torch.empty(
                (*input.shape, self.embedding_dim), dtype=qt.dtype, device=qt.qdata.device
            )
        rows = self.scheme.dequantize(gather_rows(qt, idx))
        return rows.reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        qt = self._qmeta["weight"]
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        return (
            f"{s}, scheme={qt['scheme']}, bits={qt['bits']}, group_size={qt['group_size']}, "
            f"backend={self.backend.name}"
        )


class EmbeddingReplacer(Replacer):
    """Replaces ``nn.Embedding`` when selected (opt-in; channel axis 0 = vocabulary rows)."""

    name = "embedding"
    module_types = (nn.Embedding,)
    default = False

    def skip_reason(self, name, module, model):
        cls = type(module)
        if cls.forward is not nn.Embedding.forward:
            return (
                f"{cls.__name__} overrides the forward of Embedding; kept in float so its own "
                "computation is preserved"
            )
        if module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} renormalises the table rows in place on every "
                "lookup, which a quantized table cannot do"
            )
        return None

    def replace(self, module, qweights, backend, scheme):
        qt = qweights["weight"]
        if not _gatherable(qt):
            raise CapabilityError(
                f"scheme {qt.scheme!r} stores the embedding table per tensor with "
                f"{qt.bits}-bit packed codes or groups (axis={qt.axis}, "
                f"group_size={qt.group_size}); rows cannot be looked up without "
                "dequantizing the whole table",
                "use a per-channel or group-wise scheme for embeddings, or leave them out of "
                "--only",
            )
        return QuantizedEmbedding(module, qt, backend, scheme)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "embedding"


@hookimpl
def monoquant_register_replacers(register):
    register(EmbeddingReplacer())
