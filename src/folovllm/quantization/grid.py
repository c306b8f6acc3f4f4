"""The quantization grid that RTN and GPTQ share: per group of input columns, a scale and a zero point.

A weight ``w`` is stored as an integer code ``q`` in ``[0, 2^bits - 1]`` and read back as
``s * (q - z)``. Groups run along the input dimension (``group_size`` columns of one output row
share ``s`` and ``z``; ``-1`` = one group per row), which is what every GPTQ kernel expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight before packing.

    ``codes [out, in]`` (int64, original column order), ``scales`` and ``zeros [groups, out]``,
    ``g_idx [in]``: the group of each input column (a permutation of groups after act-order).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """``s * (q - z)`` as fp32 ``[out, in]``: what a kernel computes with."""
        scales, zeros = self.scales[self.g_idx].T, self.zeros[self.g_idx].T
        return scales.float() * (self.codes - zeros).float()


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w [rows, cols]`` so the grid covers ``[min(w, 0), max(w, 0)]``.

    Symmetric grids centre the zero point (``2^(bits-1)``); asymmetric ones fit min and max. Scales
    are rounded to fp16 here, because the checkpoint stores them in fp16: codes are then chosen
    against the grid a server will really use. The format stores ``zero - 1``, so a zero point of 0
    would wrap around; such rows move it to 1 and stretch the scale to keep their maximum.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = _fp16((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    zero = torch.round(-xmin / scale).to(torch.int64)
    wraps = zero == 0
    scale = torch.where(wraps, _fp16(xmax / (maxq - 1)), scale)
    return scale, torch.where(wraps, 1, zero)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (never 0: the smallest normal fp16 is the floor)."""
    return x.clamp(min=2.0**-14).half().float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code of each element of ``w [rows, ...]`` on its row's grid (clamped to the grid)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(shape)) + zero.view(shape)
    return q.clamp(0, 2**bits - 1).to(torch.int64)


def output_rows(qw: QuantizedWeight, rows: slice) -> QuantizedWeight:
    """The part of ``qw`` that holds some output rows (one projection of a merged layer)."""
    return QuantizedWeight(qw.codes[rows], qw.scales[:, rows], qw.zeros[:, rows], qw.g_idx, qw.bits, qw.group_size)
