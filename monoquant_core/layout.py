"""The canonical layout's tensor plumbing: weights as ``[C, G, S]`` groups, 4-bit packing.

Pure reshapes with no quantization types, so every other module can build on them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["from_groups", "pack_int4", "to_groups", "unpack_int4"]


def _as_matrix(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return w.reshape(1, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def to_groups(w: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """View ``w`` as ``[C, G, group_size]`` (padding the last group by repeating its last value).

    Args:
        w: any tensor with at least one element.
        axis: channel axis, or None for per-tensor.
        group_size: group length, or None for one group per channel.

    Returns:
        A ``[C, G, S]`` tensor (a view when no padding is needed).
    """
    m = _as_matrix(w, axis)
    if group_size is None:
        return m.unsqueeze(1)
    c, k = m.shape
    pad = (-k) % group_size
    if pad:
        m = torch.cat([m, m[:, -1:].expand(c, pad)], dim=1)
    return m.reshape(c, -1, group_size)


def from_groups(g: torch.Tensor, shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[C, G, S]`` back to ``shape`` (dropping padding)."""
    numel = math.prod(shape)
    if axis is None:
        return g.reshape(-1)[:numel].reshape(shape)
    c = shape[axis]
    m = g.reshape(c, -1)[:, : numel // c if c else 0]
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return m.reshape(moved).movedim(0, axis)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values in 0..15, or -8..7 as two's complement) two per byte.

    The last dimension is packed, low nibble first; an odd length is padded with a zero code.
    """
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.int8).view(torch.uint8)
    return (codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int, signed: bool) -> torch.Tensor:
    """Unpack :func:`pack_int4` bytes to ``length`` codes per row (int8 if signed, else uint8).

    Two strided byte passes (no int16 temporaries); a signed nibble ``u`` is ``(u ^ 8) - 8``.
    """
    p = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    codes = torch.empty(*p.shape[:-1], 2 * p.shape[-1], dtype=torch.uint8, device=p.device)
    torch.bitwise_and(p, 0xF, out=codes[..., 0::2])
    torch.bitwise_right_shift(p, 4, out=codes[..., 1::2])
    codes = codes[..., :length]
    if signed:
        return codes.bitwise_xor(8).view(torch.int8).sub_(8)
    return codes if codes.is_contiguous() else codes.contiguous()
