"""The GPTQ matmul around its Triton kernel: the kernel's weight layout, a PyTorch reference,
the launch plan (GEMV-like split-K for decode, tiled GEMM for prefill) and the launch.

The checkpoint packs eight consecutive input rows per word; the kernel wants each ``tl.dot``
operand to be 16 consecutive rows taken from one bit field of 16 consecutive words, so the linear
method repacks once after loading (``pack_for_kernel``), as vLLM repacks for its own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

import torch

from folovllm.model_executor.layers.quantization.ops.gluon_gptq import (
    M_TILES,
    PREFILL_M_TILE,
    WS_MAX_M,
    WsPlan,
    launch_gptq_decode_ws,
    ws_supported,
)
from folovllm.model_executor.layers.quantization.ops.triton_gptq import (
    PER_CHANNEL,
    SLICE_ROWS,
    _gptq_gemm_block_kernel,
    _gptq_gemm_kernel,
    _gptq_gemm_pairs_kernel,
    _gptq_gemm_swap_ab_kernel,
    _gptq_gemv_kernel,
    block_rows,
)
from folovllm.triton_utils import for_device
from folovllm.triton_utils.counters import tile_counters
from folovllm.triton_utils.tuned import TunedTable
from folovllm.utils import cdiv

KERNEL_BITS = (2, 4, 8)  # bit widths that tile a 32-bit word exactly
DECODE_MAX_M = 16  # up to here one M tile holds every row: the split-K plan
GEMV_MAX_M = 4  # the FMA kernel's most rows (a 16-row tl.dot would be mostly padding); tuned plans choose
LONG_PREFILL_M = 1024  # above this many rows the tuned table's 4096-row plans (wider tiles) apply
_MIN_BLOCKS_PER_SPLIT = 4  # shorter K ranges save less than their partial sums cost
_MAX_SPLIT_K = 16
_SHARED_BYTES = 200 * 1024  # a whole-block plan's estimated shared memory: Hopper allows 227 KiB per block


def pack_for_kernel(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[K, N]`` -> int32 ``[cdiv(K, BLOCK_K) * 16, N]``; bit field ``j`` of word row ``16 b + t``
    holds row ``BLOCK_K b + 16 j + t`` (K is padded with zero codes to whole blocks)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits must be one of {KERNEL_BITS} for the kernel layout, got {bits}")
    k, n = codes.shape
    pack, rows = 32 // bits, block_rows(bits)
    padded = torch.zeros(cdiv(k, rows) * rows, n, dtype=torch.int64, device=codes.device)
    padded[:k] = codes
    fields = padded.view(-1, pack, SLICE_ROWS, n)  # [block, j, t, n]
    shifts = (torch.arange(pack, device=codes.device) * bits).view(1, pack, 1, 1)
    words = (fields << shifts).sum(dim=1).reshape(-1, n)  # disjoint bit fields: the sum is an OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_from_kernel(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_for_kernel``: int64 codes ``[k, N]``."""
    pack = 32 // bits
    words = qweight.to(torch.int64).view(-1, 1, SLICE_ROWS, qweight.shape[1])
    shifts = (torch.arange(pack, device=qweight.device) * bits).view(1, pack, 1, 1)
    return ((words >> shifts) & (2**bits - 1)).reshape(-1, qweight.shape[1])[:k]


def gptq_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Dequantize the whole weight, then one matmul: what the kernel must equal (and the CPU path)."""
    k = x.shape[-1]
    groups = torch.arange(k, device=x.device) // (k if group_size == -1 else group_size)
    w = (unpack_from_kernel(qweight, bits, k) - zeros[groups].float()) * scales[groups].float()
    out = (x if perm is None else x[..., perm]).float() @ w
    return (out if bias is None else out + bias.float()).to(x.dtype)


@dataclass(frozen=True)
class GemmPlan:
    """Tile sizes and the K split of one launch; fixed by the shapes alone (CUDA-graph safe)."""

    block_m: int
    block_n: int
    dequant_tiles: bool  # dequantize weight slices (prefill) or scale the product per group (decode)
    split_k: int
    blocks_per_split: int
    num_warps: int
    num_stages: int
    gemv: bool = False  # the FMA kernel (one row of X per program: ``block_m`` must be 1) instead of the tl.dot one
    swap_ab: bool = False  # decode tl.dot with the codes as first operand (``_gptq_gemm_swap_ab_kernel``)
    block_dot: bool = False  # prefill: one tl.dot per dequantized block of rows (``_gptq_gemm_block_kernel``)
    pairs: bool = False  # swap_ab with codes made bf16 two per word op (``_gptq_gemm_pairs_kernel``; bf16, bits < 8)
    ws: bool = False  # the warp-specialized Gluon kernel (``gluon_gptq.py``); ``num_stages`` is its ring depth
    maxnreg: int | None = None  # registers per thread, a launch option (programs per SM); None: the compiler's choice


# ``configs/gptq_decode_NVIDIA_H200.json``: plans measured per GPU model (``bench gptq --sweep``)
TUNED = TunedTable(Path(__file__).parent / "configs", "gptq_decode", GemmPlan)


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_for(tiles: int, k_blocks: int, target_programs: int, min_blocks: int = _MIN_BLOCKS_PER_SPLIT) -> tuple[int, int]:
    """``(split_k, blocks_per_split)``: double the K split while the grid stays within ``target_programs``
    and every split keeps at least ``min_blocks`` blocks."""
    split = 1
    while split * 2 <= _MAX_SPLIT_K and tiles * split * 2 <= target_programs and k_blocks >= 2 * split * min_blocks:
        split *= 2
    per_split = cdiv(k_blocks, split)
    return cdiv(k_blocks, per_split), per_split


def tuned_key(bits: int, m: int, k: int, n: int) -> str:
    """A tuned plan covers ``m`` = 1, 2..4, 5..16, 17..64, 65..1024 or more rows of one ``K x N`` weight (the sweep
    times 1, 4, 16, 64, 256 and 4096): a long prompt's tiles fill the GPU many times over, a short one's do not."""
    rows = 1 if m == 1 else 4 if m <= GEMV_MAX_M else DECODE_MAX_M if m <= DECODE_MAX_M else 64 if m <= 64 else 256
    rows = 4096 if m > LONG_PREFILL_M else rows
    return f"bits={bits},m={rows},k={k},n={n}"


def write_tuned_plans(gpu_name: str, plans: dict[str, dict], source: dict, merge: bool = False) -> Path:
    """Save the fastest plans of a sweep for this GPU model; later launches in any process use them
    (``merge``: a sweep of some M only, the table's other entries kept)."""
    path = TUNED.write(gpu_name, plans, source, merge)
    plan_gptq_gemm.cache_clear()
    return path


@lru_cache(maxsize=4096)  # called by every eager launch; a pure function of its arguments
def plan_gptq_gemm(m: int, n: int, k: int, bits: int, device: torch.device, itemsize: int = 2) -> GemmPlan:
    """Decode (``m <= 16``) is bound by the weight stream: split K until ~4 programs per SM stream
    weights, with scales applied to the product per group; one row runs the FMA kernel, more rows
    16-row ``tl.dot`` tiles. Prefill: whole dequantized blocks per ``tl.dot``, no split (enough
    tiles; compute-bound); above 64 rows on Hopper the Gluon kernel in 128-row tiles instead (``_prefill_ws_plan``).
    A GPU model with tuned plans (``bench gptq --sweep`` writes them) uses those for the shapes it was tuned on."""
    k_blocks = cdiv(k, block_rows(bits))
    if device.type == "cuda":
        tuned = TUNED.plans(torch.cuda.get_device_name(device)).get(tuned_key(bits, m, k, n))
        if tuned is not None:
            return tuned
    if m > WS_MAX_M and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return _prefill_ws_plan(m, k_blocks)
    if m > DECODE_MAX_M:  # whole-block products: 1.33-1.72x the sliced tiles at M = 256 on the H200 (606708c)
        return _block_dot_plan(m, k_blocks, bits, itemsize)
    target = 4 * _num_sms(device) if device.type == "cuda" else 1
    if m == 1:  # untuned, the FMA kernel at one row only: at 4 rows the H200 sweep timed it 30-50x slower than tl.dot
        split, per_split = split_k_for(cdiv(n, 128), k_blocks, target)
        return GemmPlan(1, 128, False, split, per_split, 4, 3, gemv=True)
    split, per_split = split_k_for(cdiv(n, 64), k_blocks, target)
    return GemmPlan(16, 64, False, split, per_split, 4, 4)


def _prefill_ws_plan(m: int, k_blocks: int) -> GemmPlan:
    """The Gluon kernel in 128-row tiles, as the H200 sweep tuned it on all of Qwen3-8B's projections
    (``M7-prefill-ws2-h200.json``: 1.1-1.9x the whole-block kernel at 256 rows, 1.6-1.8x at 4096): 128 columns up
    to ``LONG_PREFILL_M`` rows (more column tiles for fewer rows), 256 above (X read from L2 half as often). Where
    Gluon does not run (act-order aside, other activations or bits) ``launch_gptq_gemm`` runs whole blocks instead."""
    block_n, stages = (128, 4) if m <= LONG_PREFILL_M else (256, 2)
    return GemmPlan(PREFILL_M_TILE, block_n, False, 1, k_blocks, 8, stages, swap_ab=True, pairs=True, ws=True,
                    maxnreg=168)  # fmt: skip


def _block_dot_plan(m: int, k_blocks: int, bits: int, itemsize: int) -> GemmPlan:
    """Whole-block tiles that fit in shared memory: the pipeline stages X's ``BLOCK_M x rows`` and the
    dequantized ``rows x BLOCK_N`` per stage, so 2-bit blocks (256 rows) or fp32 activations need smaller
    tiles; the larger side is halved until the estimate fits (it runs ~25% above what Triton allocates)."""
    block_m, block_n, stages = 64 if m <= 64 else 128, 128, 3
    while stages * (block_m + block_n) * block_rows(bits) * itemsize > _SHARED_BYTES:
        block_m, block_n = (block_m // 2, block_n) if block_m > block_n else (block_m, block_n // 2)
    return GemmPlan(block_m, block_n, True, 1, k_blocks, 4, stages, block_dot=True)


def _constexprs(plan: GemmPlan, bits: int, group_size: int, has_perm: bool, has_bias: bool) -> dict:
    """The compile-time arguments both kernels take (group_size -1, per channel, as one group longer than any K)."""
    group = PER_CHANNEL if group_size == -1 else group_size
    return dict(
        BITS=bits, GROUP_SIZE=group, SLICES_PER_GROUP=min(max(group // SLICE_ROWS, 1), 32 // bits),
        HAS_PERM=has_perm, HAS_BIAS=has_bias, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, SPLIT_K=plan.split_k,
    )  # fmt: skip


def _kernel_for(plan: GemmPlan, act: torch.dtype, bits: int) -> tuple[object, dict]:
    """The kernel a plan runs and the compile-time arguments it takes beyond ``_constexprs`` (``tl.dot`` in IEEE
    precision for fp32 activations, as the reference computes; the tensor cores' default otherwise). A ``pairs``
    plan runs as its ``swap_ab`` twin where bf16 codes cannot serve: other activations, or 8-bit codes (128 + q
    is exact in bf16 below q = 128 only)."""
    precision = "ieee" if act == torch.float32 else "tf32"
    if plan.gemv:
        return _gptq_gemv_kernel, {}
    if plan.pairs and act == torch.bfloat16 and bits < 8:
        return _gptq_gemm_pairs_kernel, {}
    if plan.block_dot or plan.swap_ab:
        return (_gptq_gemm_block_kernel if plan.block_dot else _gptq_gemm_swap_ab_kernel), dict(DOT_PRECISION=precision)
    return _gptq_gemm_kernel, dict(DOT_PRECISION=precision, DEQUANT_TILES=plan.dequant_tiles)


def as_ws_plan(plan: GemmPlan, m: int) -> WsPlan:
    """The Gluon launch a ``ws`` plan stands for at ``m`` rows: its tiles, split, ring depth and register cap, and the
    fewest rows of X per product (8, 16, 32 or 64) that hold all ``m``; a prefill plan (``block_m`` 128) tiles the
    rows by 128 and multiplies by the weights themselves, scaled in bf16 (``WsPlan.scaled``)."""
    prefill = plan.block_m == PREFILL_M_TILE
    m_tile = PREFILL_M_TILE if prefill else next(t for t in M_TILES if t >= min(m, WS_MAX_M))
    return WsPlan(plan.block_n, plan.split_k, plan.num_stages, False, plan.maxnreg or 80, plan.num_warps, m_tile,
                  scaled=prefill)  # fmt: skip


def launch_gptq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """The kernel, unchecked: ``x [M, K]`` (unit stride along K) -> ``[M, N]`` in ``x``'s dtype.

    With act-order and more than one row, X is permuted once here (one gather of ``M x K`` values)
    rather than gathered through ``perm`` by every column tile of the kernel: ``N / BLOCK_N`` scattered
    reads of all of X, which made act-order about 2x slower than the plain kernel at 16 rows and 6-7x
    slower at 256 on the H200 (0a8f201).
    One row keeps the in-kernel gather, which costs less than a launch there.
    A ``ws`` plan runs the Gluon kernel where it applies (``ws_supported``) and its Triton twin elsewhere (the pairs
    kernel; for a prefill plan the whole-block kernel)."""
    m, k = x.shape
    n = qweight.shape[1]
    if perm is not None and m > 1:
        x, perm = x[:, perm], None
    plan = plan or plan_gptq_gemm(m, n, k, bits, x.device, x.element_size())
    if plan.gemv and plan.block_m != 1:
        raise ValueError(f"a GEMV plan runs one row of X per program: block_m must be 1, got {plan.block_m}")
    if plan.swap_ab and (plan.gemv or plan.dequant_tiles):
        raise ValueError("swap_ab is a decode tl.dot plan: it cannot also be gemv or dequant_tiles")
    if plan.pairs and not plan.swap_ab:
        raise ValueError("pairs is a kind of swap_ab plan: it needs swap_ab=True")
    if plan.block_dot and not plan.dequant_tiles:
        raise ValueError("block_dot dequantizes whole blocks: it needs dequant_tiles=True")
    ws_rows = (DECODE_MAX_M, WS_MAX_M, PREFILL_M_TILE)
    if plan.ws and not (plan.swap_ab and plan.pairs and plan.block_m in ws_rows):
        raise ValueError(f"ws is a plan with a Triton twin: it needs swap_ab, pairs and block_m in {ws_rows}")
    if plan.ws and ws_supported(x, qweight, perm, bits, group_size):
        return launch_gptq_decode_ws(x, qweight, scales, zeros, bias, bits, group_size, as_ws_plan(plan, m))
    if plan.ws and plan.block_m == PREFILL_M_TILE:  # a prefill plan's twin: the whole-block kernel
        plan = _block_dot_plan(m, cdiv(k, block_rows(bits)), bits, x.element_size())
    elif plan.ws:  # the register cap was tuned for the Gluon kernel, not for its twin
        plan = replace(plan, ws=False, maxnreg=None)
    kernel, extra = _kernel_for(plan, x.dtype, bits)
    return launch_plan(kernel, extra, x, qweight, scales, zeros, perm, bias, bits, group_size, plan)


def launch_plan(
    kernel: object,
    extra: dict,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    plan: GemmPlan,
) -> torch.Tensor:
    """One launch of ``kernel`` (any kernel with these kernels' arguments) under ``plan``: the output, the split-K
    partials and counters, the grid; ``extra`` adds compile-time arguments or launch options (``maxnreg``)."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (cdiv(m, plan.block_m), cdiv(n, plan.block_n), plan.split_k)
    partials = counters = out
    if plan.split_k > 1:
        partials = torch.empty(plan.split_k, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, grid[0] * grid[1])
    common = _constexprs(plan, bits, group_size, perm is not None, bias is not None) | dict(
        num_warps=plan.num_warps, num_stages=plan.num_stages
    )
    if plan.maxnreg is not None:
        common["maxnreg"] = plan.maxnreg
    args = (x, qweight, scales, zeros, x if perm is None else perm, x if bias is None else bias, out, partials,
            counters, m, n, k, x.stride(0), plan.blocks_per_split)  # fmt: skip
    for_device(kernel, x.device)[grid](*args, **extra, **common)
    return out


def kernel_arg_types(act: str = "bf16") -> dict[str, str]:
    """The Triton type of every runtime argument the GPTQ kernels take, for ``act`` (``"bf16"`` or ``"fp32"``)
    activations: what ``compile_for_gpu`` needs to compile one on any machine."""
    pointers = dict(X=f"*{act}", QWeight="*i32", Scales="*fp16", Zeros="*fp16", Perm="*bf16", Bias=f"*{act}",
                    Out=f"*{act}", Partials="*fp32", Counters="*i32")  # fmt: skip
    return pointers | dict(M="i32", N="i32", K="i32", stride_xm="i32", blocks_per_split="i32")


def compile_plan(
    plan: GemmPlan, bits: int = 4, group_size: int = 128, capability: int = 90, act: str = "bf16"
) -> dict[str, str]:
    """The kernel ``launch_gptq_gemm`` runs for ``plan`` on ``act`` activations (``"bf16"`` or ``"fp32"``),
    compiled for an NVIDIA GPU of compute capability ``capability`` on any machine (``compile_for_gpu``):
    its layouts, barriers, loop and shared memory."""
    from folovllm.triton_utils.offline_compile import compile_for_gpu

    kernel, extra = _kernel_for(plan, torch.float32 if act == "fp32" else torch.bfloat16, bits)
    return compile_for_gpu(kernel, kernel_arg_types(act), _constexprs(plan, bits, group_size, False, False) | extra,
                           ("N", "K", "stride_xm"), capability, plan.num_warps, plan.num_stages)  # fmt: skip


def gptq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W`` with ``W`` in the kernel layout; every input checked first (tests, benchmarks)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits must be one of {KERNEL_BITS}, got {bits}")
    if group_size != -1 and (group_size < SLICE_ROWS or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be -1 or a power of two >= {SLICE_ROWS}, got {group_size}")
    k, n = x.shape[-1], qweight.shape[1]
    groups = 1 if group_size == -1 else cdiv(k, group_size)
    expected = {"qweight": (cdiv(k, block_rows(bits)) * SLICE_ROWS, n), "scales": (groups, n), "zeros": (groups, n)}
    for name, tensor in {"qweight": qweight, "scales": scales, "zeros": zeros}.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for K={k}, got {tuple(tensor.shape)}")
        if tensor.device != x.device or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous and on {x.device}")
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32, got {qweight.dtype}")
    if perm is not None and (perm.shape != (k,) or perm.dtype != torch.int32):
        raise ValueError(f"perm must be int32 of shape ({k},), got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return launch_gptq_gemm(x2, qweight, scales, zeros, perm, bias, bits, group_size, plan).view(*x.shape[:-1], n)
