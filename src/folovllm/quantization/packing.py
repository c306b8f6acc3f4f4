"""The GPTQ checkpoint format (``checkpoint_format: "gptq"``) that AutoGPTQ, GPTQModel, vLLM and
transformers share, both ways.

Per linear layer with ``in`` inputs, ``out`` outputs and ``groups`` groups:

- ``qweight`` int32 ``[in * bits / 32, out]``: the codes of each output column, input rows packed
  into 32-bit words lowest bits first (row ``k`` starts at bit ``bits * k`` of the column's bit stream;
  for 3 bits a code may straddle two words);
- ``qzeros`` int32 ``[groups, out * bits / 32]``: zero points minus one, packed the same way along ``out``
  (the "minus one" is taken per 32-bit word, as GPTQModel writes it: see ``pack_zeros``);
- ``scales`` fp16 ``[groups, out]``;
- ``g_idx`` int32 ``[in]``: the group of each input row.

Everything is done on int64 bit streams, so every bit width has one code path.
"""

from __future__ import annotations

import torch

from folovllm.quantization.grid import QuantizedWeight

WORD_BITS = 32


def _bit_positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word index, shift and straddle flag of each of ``n`` consecutive ``bits``-bit values."""
    start = torch.arange(n, device=device) * bits
    shift = start % WORD_BITS
    return start // WORD_BITS, shift, shift + bits > WORD_BITS


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, cols]`` integers in ``[0, 2^bits)`` -> int32 ``[n * bits / 32, cols]``, packed down each column."""
    n = values.shape[0]
    if n * bits % WORD_BITS:
        raise ValueError(f"{n} rows of {bits}-bit values do not fill whole 32-bit words")
    v = values.to(torch.int64) & (2**bits - 1)
    word, shift, straddles = _bit_positions(n, bits, v.device)
    words = torch.zeros(n * bits // WORD_BITS + 1, values.shape[1], dtype=torch.int64, device=v.device)
    words.index_add_(0, word, (v << shift[:, None]) & 0xFFFFFFFF)  # disjoint bits: adding is OR
    words.index_add_(0, word[straddles] + 1, v[straddles] >> (WORD_BITS - shift[straddles, None]))
    return _to_int32(words[:-1])


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 tensors checkpoints store (same bits)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 ``[n * bits / 32, cols]`` -> int64 ``[n, cols]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    word, shift, straddles = _bit_positions(n, bits, w.device)
    values = w[word] >> shift[:, None]
    high = w[(word + 1).clamp(max=w.shape[0] - 1)] << (WORD_BITS - shift[:, None])
    return (values | torch.where(straddles[:, None], high, 0)) & (2**bits - 1)


def _field_ones(bits: int) -> int:
    """A 32-bit word with a 1 in the lowest bit of each ``bits``-bit field (``0x11111111`` for 4 bits)."""
    return sum(1 << shift for shift in range(0, WORD_BITS, bits))


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[groups, out]`` -> ``qzeros`` int32 ``[groups, out * bits / 32]``, stored as ``zero - 1``.

    GPTQModel subtracts the 1 from each packed word as one integer (``qzeros -= 0x11111111``), so a
    zero point of 0 borrows from the next field; AutoGPTQ subtracted per value. Both give the same
    bits whenever every zero point is >= 1 (our grids always are, see ``grid.find_params``); packing
    like GPTQModel makes ``unpack_zeros`` exact for any zero point. 3-bit fields straddle words, and
    there GPTQModel subtracts per field, modulo 8.
    """
    if WORD_BITS % bits:
        return pack_rows((zeros - 1).T, bits).T.contiguous()
    words = pack_rows(zeros.T, bits).T.to(torch.int64) & 0xFFFFFFFF
    return _to_int32((words - _field_ones(bits)) & 0xFFFFFFFF).contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of ``pack_zeros``: ``qzeros`` -> int64 zero points ``[groups, out]``.

    Adding 1 to each word as one integer undoes GPTQModel's borrows (a zero point of 0 is stored as
    field ``2^bits - 1`` with its neighbour one lower); a per-field ``+ 1`` (vLLM's kernels) would read
    such a field as ``2^bits`` and its neighbour one too low.
    """
    if WORD_BITS % bits:
        return (unpack_rows(qzeros.T, bits, out_features).T + 1) & (2**bits - 1)
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + _field_ones(bits)) & 0xFFFFFFFF
    return unpack_rows(words.T, bits, out_features).T


def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``QuantizedWeight`` -> the four checkpoint tensors (names as in the checkpoint, without the prefix)."""
    return {
        "qweight": pack_rows(qw.codes.T, qw.bits),
        "qzeros": pack_zeros(qw.zeros, qw.bits),
        "scales": qw.scales.half(),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int
) -> QuantizedWeight:
    """The four checkpoint tensors -> ``QuantizedWeight`` (zero points read back by ``unpack_zeros``).

    ``.dequantize()`` of the result is the fp32 ``[out, in]`` weight the checkpoint stands for.
    """
    in_features, out_features = g_idx.shape[0], scales.shape[1]
    codes = unpack_rows(qweight, bits, in_features).T
    zeros = unpack_zeros(qzeros, bits, out_features)
    return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int64), bits, group_size)
