"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time, and push each column's
rounding error onto the columns not yet quantized, where the layer's inputs say it costs least.

For one output row ``w`` and calibration inputs ``X [in, n]``, the output error of a quantized row
``ŵ`` is ``||wX - ŵX||² = (w - ŵ) H (w - ŵ)ᵀ / 2`` with ``H = 2 X Xᵀ``. Rounding column ``i`` to ``q``
and then moving the columns ``F`` not yet quantized by Optimal Brain Surgeon's update

    δ_F = -(w_i - q) · [H_F⁻¹]_{i,F} / [H_F⁻¹]_{ii}

is the best any change of ``F`` can do. ``H_F⁻¹`` shrinks by one row and column per step (a Schur
complement); GPTQ observes that in a fixed column order the rows it needs are the rows of ``U``, the
upper Cholesky factor of ``H⁻¹`` (``[H_F⁻¹]_{ij} = U_ii U_ij``), so one Cholesky replaces ``in``
downdates. Updates to columns beyond the current block are batched into one matmul per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from folovllm.quantization.grid import QuantizedWeight, find_params, quantize_codes
from folovllm.quantization.rtn import check_quant_args


class HessianAccumulator:
    """``H = 2/n Σ x xᵀ`` over every calibration row ``x`` a linear layer sees (a running mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.num_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.hessian.shape[0]).float()
        total = self.num_samples + x.shape[0]
        self.hessian *= self.num_samples / total
        self.num_samples = total
        x = x * (2 / total) ** 0.5
        self.hessian += x.T @ x


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """``U`` with ``UᵀU = (H + λI)⁻¹``, ``λ`` = ``damp_percent`` of H's mean diagonal (keeps H invertible)."""
    h = hessian.clone()
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"the Hessian is not positive definite even with damp_percent={damp_percent}; "
            "use more calibration tokens or a larger damp_percent"
        ) from err


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops; on CPU, handing each to a thread pool costs more
    than it saves (up to 1000x on a busy machine), so it runs on one thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` given its inputs' ``hessian [in, in]``.

    ``desc_act`` (act-order) quantizes the columns with the largest inputs (largest ``H_ii``) first,
    while many columns remain to absorb their error; groups then follow that order, so ``g_idx``
    is a permutation of groups. A group's scale and zero point are fitted when quantization reaches
    its first column, on the columns as updated so far.
    """
    check_quant_args(bits, group_size)
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0  # inputs that are always zero: any value works, zero is simplest
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if desc_act else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_cholesky(h, damp_percent)
    size = cols if group_size == -1 else group_size
    block = size * max(1, block_size // size) if size < cols else block_size  # groups never straddle blocks
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=w.device)
    scales, zeros = [], []
    if group_size == -1:
        scale, zero = find_params(w, bits, sym)
        scales.append(scale)
        zeros.append(zero)
    with _one_cpu_thread(w.device):
        for b0 in range(0, cols, block):
            b1 = min(b0 + block, cols)
            w1, u1 = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
            err1 = torch.zeros_like(w1)
            for i in range(b1 - b0):
                if group_size != -1 and (b0 + i) % group_size == 0:
                    scale, zero = find_params(w1[:, i : i + group_size], bits, sym)
                    scales.append(scale)
                    zeros.append(zero)
                code = quantize_codes(w1[:, i], scale, zero, bits)
                codes[:, b0 + i] = code
                err = (w1[:, i] - scale * (code - zero)) / u1[i, i]
                w1[:, i:] -= err[:, None] * u1[i, i:][None, :]  # OBS update inside the block
                err1[:, i] = err
            w[:, b1:] -= err1 @ u[b0:b1, b1:]  # the block's updates to every later column, at once
    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=w.device) // size)[inv]
    return QuantizedWeight(codes[:, inv], torch.stack(scales), torch.stack(zeros), g_idx.to(torch.int32), bits, group_size)
