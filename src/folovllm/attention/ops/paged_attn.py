"""Launching the PagedAttention kernels: validation, the launch plan, split-K scratch.

``store_kv`` and ``paged_attention`` are the checked public entry points (tests,
benchmarks). Backends plan once per step (``plan_paged_attention``) and call the
unchecked ``launch_*`` functions from every layer, so a layer costs one launch
and no host arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton

from folovllm.attention.backends.abstract import AttentionMetadata, AttentionSpec
from folovllm.attention.ops.triton_paged_attn import _paged_attention_kernel, _store_kv_kernel
from folovllm.triton_utils import for_device
from folovllm.triton_utils.counters import tile_counters
from folovllm.triton_utils.pdl import pdl_supported
from folovllm.utils import cdiv

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_SPLIT_TOKENS = 512  # shorter slices saved less GPU time than their merge cost (H200; merge then a 2nd launch)
MAX_SPLITS = 16
_CHUNK_WAVES = 2  # programs per SM a chunk's tiles aim at (H200: `bench prefill --num-splits`, stage chunksplits)


def _check_inputs(kv_cache: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Kernels index the cache as contiguous and load every operand in the cache's dtype."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"kv_cache dtype must be float32, float16 or bfloat16, got {kv_cache.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    head_dim = kv_cache.shape[4]
    for name, x in tensors.items():
        if x.dim() != 3 or x.shape[2] != head_dim or x.stride(2) != 1:
            raise ValueError(
                f"{name} must be [T, heads, {head_dim}] with a contiguous last dim, "
                f"got shape {tuple(x.shape)} strides {x.stride()}"
            )
        if x.dtype != kv_cache.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must match the kv_cache dtype {kv_cache.dtype}")
        if x.device != kv_cache.device:
            raise ValueError(f"{name} is on {x.device} but kv_cache is on {kv_cache.device}")


def launch_store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """The store kernel, unchecked: one program per token; slot -1 (padding) is skipped."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    for_device(_store_kv_kernel, k.device)[(k.shape[0],)](
        k, v, kv_cache, slot_mapping, kv_cache.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, Hkv, D]`` into flat slots ``slot_mapping [T]`` of ``kv_cache``; slot -1 is skipped."""
    _check_inputs(kv_cache, k=k, v=v)
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    if k.shape != v.shape or k.shape[1] != num_kv_heads:
        raise ValueError(f"k and v must both be [T, {num_kv_heads}, {head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
    if k.shape[0]:
        launch_store_kv(k, v, kv_cache, slot_mapping)


def _tile_config(group_pad: int, block_d: int, max_query_len: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, from a sweep on an H200 (bf16).

    Decode rows only need ``GROUP`` query rows, but ``tl.dot`` wants at least 16;
    prefill tiles take 64 rows so each K/V tile feeds more math.
    """
    block_n = 64 if block_d <= 128 else 32
    if max_query_len == 1:
        return max(16, group_pad), block_n, 4, 3
    return max(64, group_pad), block_n, 4 if block_d <= 128 else 8, 2


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    device: torch.device, num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
    query_tiles: int = 1,
) -> int:  # fmt: skip
    """Split-K slices per context: >1 only when a launch's programs are too few to fill the GPU.

    A decode batch has one program per (sequence, KV head); it streams its context, so the SMs filled
    twice over are enough. A step with longer queries is counted by its ``query_tiles`` (a chunk's tiles
    carry the work; decode rows beside them are light); its tiles are matmul work, and on the H200 two
    resident per SM were fastest (one left a 512-token chunk at depth 8k at 135 TFLOP/s, two reached 249,
    more only added merging), so slices are added while they keep within ``_CHUNK_WAVES`` programs per SM.
    A power of two (each value compiles its own kernel), at most ``MAX_SPLITS``, and no slice shorter than
    ``_MIN_SPLIT_TOKENS``.
    """
    if device.type != "cuda":
        return 1
    if max_query_len == 1:
        by_occupancy = cdiv(2 * _num_sms(device), num_seqs * num_kv_heads)
    else:
        by_occupancy = max(1, _CHUNK_WAVES * _num_sms(device) // (max(1, query_tiles) * num_kv_heads))
    by_length = max_seq_len // _MIN_SPLIT_TOKENS
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(min(by_occupancy, by_length) + 1) // 2))


@dataclass(frozen=True)
class PagedAttentionPlan:
    """Grid and tile sizes of one step (or one captured batch size); every layer reuses it."""

    grid: tuple[int, int, int]
    num_kv_heads: int
    head_dim: int
    block_size: int
    group: int
    group_pad: int
    q_tile: int
    search: bool  # queries longer than one tile: programs find their sequence by binary search
    block_m: int
    block_n: int
    block_d: int
    num_splits: int
    min_split: int  # no slice shorter (a multiple of block_n): shorter contexts run unsplit, on the device
    num_warps: int
    num_stages: int
    dot_precision: str


def plan_paged_attention(
    spec: AttentionSpec, block_size: int, device: torch.device, num_seqs: int, max_query_len: int,
    max_seq_len: int, num_splits: int | None = None, num_tokens: int | None = None,
) -> PagedAttentionPlan:  # fmt: skip
    """The launch for ``num_seqs`` rows of ``num_tokens`` queries in all (default: every row at
    ``max_query_len``) whose longest query and context are the given lengths.

    ``num_splits`` None picks split-K by occupancy, with no slice shorter than
    ``_MIN_SPLIT_TOKENS``; an int forces that many slices of any length. The kernel
    reads every length on the device and slices each context by its own length
    (a context shorter than the minimum slice runs unsplit, merge-free), so the plan
    stays valid for any batch within these bounds (what a captured CUDA graph needs).
    """
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"q heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})")
    group = spec.num_heads // spec.num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(spec.head_dim))
    block_m, block_n, num_warps, num_stages = _tile_config(group_pad, block_d, max_query_len)
    q_tile = block_m // group_pad
    search = max_query_len > q_tile
    if num_tokens is None:
        num_tokens = num_seqs * max_query_len
    num_programs = num_tokens // q_tile + num_seqs if search else num_seqs
    min_split = block_n
    if num_splits is None:
        tiles = num_tokens // q_tile
        num_splits = choose_num_splits(device, num_seqs, spec.num_kv_heads, max_query_len, max_seq_len, tiles)
        min_split = cdiv(_MIN_SPLIT_TOKENS, block_n) * block_n
    return PagedAttentionPlan(
        grid=(num_programs, spec.num_kv_heads, num_splits), num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, block_size=block_size, group=group, group_pad=group_pad, q_tile=q_tile,
        search=search, block_m=block_m, block_n=block_n, block_d=block_d, num_splits=num_splits,
        min_split=min_split, num_warps=num_warps, num_stages=num_stages,
        dot_precision="ieee" if spec.dtype == torch.float32 else "tf32",
    )  # fmt: skip


@dataclass
class SplitScratch:
    """Partial results of split-K: one ``[D]`` accumulator, max and sum per (token, head, split)."""

    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the softmax denominator's usual name)

    @classmethod
    def allocate(cls, plan: PagedAttentionPlan, num_tokens: int, num_heads: int,
                 device: torch.device) -> "SplitScratch | None":  # fmt: skip
        if plan.num_splits == 1:
            return None
        parts = num_tokens * num_heads * plan.num_splits
        return cls(
            torch.empty(parts, plan.block_d, dtype=torch.float32, device=device),
            torch.empty(parts, dtype=torch.float32, device=device),
            torch.empty(parts, dtype=torch.float32, device=device),
        )


def launch_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, plan: PagedAttentionPlan, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, scratch: SplitScratch | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The attention kernel (split merge included), unchecked. Reads every length from device memory."""
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    parts = (scratch.acc, scratch.m, scratch.l) if scratch is not None else (out, out, out)  # unused when 1 split
    counters = tile_counters(q.device, plan.grid[0] * plan.grid[1]) if plan.num_splits > 1 else seq_lens
    for_device(_paged_attention_kernel, q.device)[plan.grid](
        q, kv_cache, out, *parts, counters, block_table, seq_lens, query_start_loc,
        scale * _LOG2E, len(seq_lens), plan.min_split, kv_cache.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        NUM_KV_HEADS=plan.num_kv_heads, GROUP=plan.group, GROUP_PAD=plan.group_pad, Q_TILE=plan.q_tile,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, HEAD_DIM=head_dim,
        BLOCK_SIZE=plan.block_size, NUM_SPLITS=plan.num_splits, DOT_PRECISION=plan.dot_precision,
        SEARCH=plan.search, PDL=pdl_supported(q.device), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return out


def paged_attention_variants(
    spec: AttentionSpec, block_size: int, device: torch.device
) -> list[tuple[PagedAttentionPlan, int]]:
    """Every variant of the kernel a step can reach, as ``(plan, query length)`` for one sequence: decode tiles at
    every split-K count (with its merge), one prefill tile, and two tiles (the binary-search variant)."""
    one_tile = plan_paged_attention(spec, block_size, device, num_seqs=1, max_query_len=2, max_seq_len=2)
    longest = one_tile.q_tile + 1
    launches = [
        (plan_paged_attention(spec, block_size, device, 1, 1, 1, num_splits=2**i), 1) for i in range(MAX_SPLITS.bit_length())
    ]
    return launches + [(one_tile, 2), (plan_paged_attention(spec, block_size, device, 1, longest, longest), longest)]


def launch_on_block_zero(kv_cache: torch.Tensor, spec: AttentionSpec, block_table_width: int, plan: PagedAttentionPlan,
                         q_len: int) -> None:  # fmt: skip
    """One launch of ``plan`` for a query of ``q_len`` zeros whose every row reads block 0 of ``kv_cache``; the block
    table has the engine's row stride (so the launch specializes as real ones do) and room for the query's blocks."""
    device = kv_cache.device
    table = torch.zeros(max(block_table_width, cdiv(q_len, kv_cache.shape[2])), dtype=torch.int32, device=device)
    block_table = table.as_strided((1, block_table_width), (block_table_width, 1))
    lens = torch.tensor([q_len], dtype=torch.int32, device=device)
    starts = torch.tensor([0, q_len], dtype=torch.int32, device=device)
    q = torch.zeros(q_len, spec.num_heads, spec.head_dim, dtype=kv_cache.dtype, device=device)
    scratch = SplitScratch.allocate(plan, q_len, spec.num_heads, device)
    launch_paged_attention(q, kv_cache, plan, starts, lens, block_table, 1.0, scratch)


def warm_up_paged_attention(kv_cache: torch.Tensor, spec: AttentionSpec, block_table_width: int) -> int:
    """Launch every variant of the kernel that a step can reach (``paged_attention_variants``), once, on one block
    of ``kv_cache``.

    Each variant is a Triton compilation of hundreds of milliseconds, paid by the
    first step that needs it: a stall for every running request, in the middle of
    serving. An engine calls this at start-up, after capturing its graphs. Returns
    how many variants were launched.
    """
    variants = paged_attention_variants(spec, kv_cache.shape[2], kv_cache.device)
    for plan, q_len in variants:
        launch_on_block_zero(kv_cache, spec, block_table_width, plan, q_len)
    return len(variants)


def check_paged_metadata(metadata: AttentionMetadata, device: torch.device, block_size: int) -> None:
    """What the kernel reads from ``metadata`` is there, on ``device``, for this cache's block size."""
    if metadata.block_table is None or metadata.block_table.stride(-1) != 1:
        raise ValueError("metadata.block_table must be a [B, max_blocks] tensor with contiguous rows")
    for name in ("block_table", "seq_lens", "query_start_loc"):
        if getattr(metadata, name).device != device:
            raise ValueError(f"metadata.{name} is on {getattr(metadata, name).device}, q on {device}")
    if metadata.block_size != block_size:
        raise ValueError(f"metadata.block_size ({metadata.block_size}) != kv_cache block size ({block_size})")


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of ``q [T, Hq, D]`` over the paged cache -> ``[T, Hq, D]`` in q's dtype.

    Expects this step's K/V already stored. One launch serves the whole ragged
    batch. Grid ``(num_q_programs, num_kv_heads, num_splits)``:

    * a program owns one KV head, so its K/V tiles are read from memory once
      for all ``Hq / Hkv`` query heads of that head (GQA costs no extra traffic);
    * a program owns one tile of one sequence's queries: one program per
      sequence in a decode batch, ``T // Q_TILE + num_seqs`` in a ragged batch
      of ``T`` tokens (each sequence's tiles start at its own offset; the few
      spare programs exit at once), so a long chunk among short rows costs no
      empty programs for the short ones;
    * ``num_splits`` cuts each context into slices that the last to finish merges,
      so a handful of long sequences still occupies every SM. ``None`` picks
      it (>1 when the sequences or a chunk's query tiles are too few to fill the GPU); an int forces it.
    """
    _check_inputs(kv_cache, q=q)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_tokens != metadata.num_tokens:
        raise ValueError(f"q has {num_tokens} tokens but metadata.query_lens_cpu sums to {metadata.num_tokens}")
    if num_tokens == 0:
        return torch.empty_like(q)
    check_paged_metadata(metadata, q.device, block_size)
    plan = plan_paged_attention(
        AttentionSpec(num_heads, num_kv_heads, head_dim, kv_cache.dtype), block_size, q.device,
        metadata.num_seqs, metadata.max_query_len, metadata.max_seq_len, num_splits, metadata.num_tokens,
    )  # fmt: skip
    scratch = SplitScratch.allocate(plan, num_tokens, num_heads, q.device)
    return launch_paged_attention(
        q, kv_cache, plan, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale, scratch
    )
