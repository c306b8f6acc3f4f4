"""Attention alone, without the model: decode (M3) and prefill (M4) per backend.

Decode: the Triton paged kernel against the naive gather + matmul path.

Decode attention reads every cached K/V byte of every sequence once per step
and does almost no math per byte, so its natural unit is GB/s, compared with
``measure_copy_bandwidth`` of the same card.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from folovllm.attention.backends.abstract import AttentionMetadata, AttentionSpec
from folovllm.attention.backends.naive import attend_padded, gather_paged_kv
from folovllm.attention.ops.paged_attn import MAX_SPLITS, choose_num_splits, paged_attention
from folovllm.benchmarks.common import provenance
from folovllm.benchmarks.hardware import graph_time_s, measure_copy_bandwidth, measure_matmul_tflops, median_time_s
from folovllm.config import resolve_device, resolve_dtype
from folovllm.utils import cdiv, prefix_sums


def _check_shape(sizes: list[tuple[str, int]]) -> None:
    """Every size a positive integer and the query heads a multiple of the KV heads (named in the error)."""
    for name, value in sizes:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    heads = dict(sizes)
    if heads["num_heads"] % heads["num_kv_heads"]:
        raise ValueError(f"num_heads ({heads['num_heads']}) must be a multiple of num_kv_heads ({heads['num_kv_heads']})")


def decode_metadata(
    num_seqs: int, context_len: int, block_size: int, device: torch.device, generator: torch.Generator
) -> AttentionMetadata:
    """One decode token per sequence, each over ``context_len`` tokens in randomly placed blocks."""
    blocks_per_seq = cdiv(context_len, block_size)
    block_table = torch.randperm(num_seqs * blocks_per_seq, generator=generator, device=device)
    block_table = block_table.view(num_seqs, blocks_per_seq).to(torch.int32)
    last = context_len - 1
    slot_mapping = block_table[:, last // block_size].long() * block_size + last % block_size
    return AttentionMetadata(
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), context_len, dtype=torch.int32, device=device),
        block_table=block_table,
        slot_mapping=slot_mapping,
        query_lens_cpu=[1] * num_seqs,
        seq_lens_cpu=[context_len] * num_seqs,
        block_size=block_size,
    )


def bench_paged_decode(
    num_seqs: int,
    context_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    num_splits: int | None = None,
    warmup: int | None = None,
    iters: int | None = None,
) -> dict:
    """Time one decode step of attention (median, no K/V store) for both backends.

    ``kv_bytes_read`` counts the K and V of every context token once: the least
    any decode kernel must read, so ``achieved_GBps`` is a lower bound on the
    real traffic. A KV cache smaller than the GPU's L2 (~50 MB on H100/H200) is
    partly served from L2 and can beat the copy bandwidth. ``max_abs_diff``
    checks the two outputs agree; the naive fields are None when its padded
    fp32 copy of the cache does not fit in memory.
    """
    device = torch.device(device)
    _check_shape(
        [
            ("num_seqs", num_seqs),
            ("context_len", context_len),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
        ]
    )
    if warmup is None:
        warmup = 10 if device.type == "cuda" else 1
    if iters is None:
        iters = 50 if device.type == "cuda" else 3
    gen = torch.Generator(device=device).manual_seed(0)
    md = decode_metadata(num_seqs, context_len, block_size, device, gen)
    num_blocks = md.block_table.numel()
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen, device=device).to(dtype)
    scale = head_dim**-0.5
    ones = torch.ones(num_seqs, dtype=torch.int32, device=device)

    def triton_step() -> torch.Tensor:
        return paged_attention(q, kv_cache, md, scale, num_splits=num_splits)

    def naive_step() -> torch.Tensor:
        k, v = gather_paged_kv(kv_cache, md.block_table, context_len)
        return attend_padded(q[:, None], k, v, ones, md.seq_lens, scale)[:, 0].to(dtype)

    kv_bytes = 2 * num_seqs * context_len * num_kv_heads * head_dim * kv_cache.element_size()
    time_s = median_time_s(triton_step, device, warmup, iters)
    naive: dict[str, float | None] = dict.fromkeys(("naive_time_us", "naive_GBps", "speedup_vs_naive", "max_abs_diff"))
    try:
        diff = (triton_step().float() - naive_step().float()).abs().max().item()
        naive_s = median_time_s(naive_step, device, warmup, iters)
        naive = {
            "naive_time_us": naive_s * 1e6,
            "naive_GBps": kv_bytes / naive_s / 1e9,
            "speedup_vs_naive": naive_s / time_s,
            "max_abs_diff": diff,
        }
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
    return {
        "num_seqs": num_seqs,
        "context_len": context_len,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "num_splits": num_splits or choose_num_splits(device, num_seqs, num_kv_heads, 1, context_len),
        "kv_bytes_read": kv_bytes,
        "time_us": time_s * 1e6,
        "achieved_GBps": kv_bytes / time_s / 1e9,
        **naive,
    }


def bench_attention_sweep(
    num_seqs: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``bench_paged_decode`` for every (num_seqs, context_len) pair, against the card's copy bandwidth.

    Meant for a GPU: on CPU the Triton kernel runs in the interpreter, so keep shapes tiny there.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    copy_gbps = measure_copy_bandwidth(dev)
    rows = []
    for n, ctx in itertools.product(num_seqs, context_lens):
        row = bench_paged_decode(n, ctx, num_heads, num_kv_heads, head_dim, block_size, dt, dev)
        row["fraction_of_copy_bw"] = row["achieved_GBps"] / copy_gbps
        rows.append(row)
    return {
        "benchmark": "attention",
        **provenance(dev, "none (kernel only)", dt),
        "milestone": "M3",
        "workload": {
            "num_seqs": list(num_seqs),
            "context_lens": list(context_lens),
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "block_size": block_size,
        },
        "copy_GBps": copy_gbps,
        "results": rows,
    }


def prefill_metadata_paged(
    prompt_lens: list[int], block_size: int, device: torch.device, generator: torch.Generator
) -> AttentionMetadata:
    """Fresh prefills of ``prompt_lens`` tokens whose cache blocks sit at random places."""
    blocks = [cdiv(n, block_size) for n in prompt_lens]
    physical = torch.randperm(sum(blocks), generator=generator, device=device).to(torch.int32)
    block_table = torch.zeros(len(prompt_lens), max(blocks), dtype=torch.int32, device=device)
    slots, used = [], 0
    for b, (n, nb) in enumerate(zip(prompt_lens, blocks)):
        block_table[b, :nb] = physical[used : used + nb]
        used += nb
        pos = torch.arange(n, device=device)
        slots.append(block_table[b, pos // block_size].long() * block_size + pos % block_size)
    starts = torch.tensor(prefix_sums(prompt_lens), dtype=torch.int32, device=device)
    lens = torch.tensor(prompt_lens, dtype=torch.int32, device=device)
    return AttentionMetadata(
        query_start_loc=starts,
        seq_lens=lens,
        block_table=block_table,
        slot_mapping=torch.cat(slots),
        query_lens_cpu=list(prompt_lens),
        seq_lens_cpu=list(prompt_lens),
        block_size=block_size,
    )


def bench_prefill_attention(
    prompt_lens: list[int],
    num_prompts: int = 1,
    num_heads: int = 16,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
    backends: tuple[str, ...] = ("naive", "triton", "flash_attn"),
) -> dict[str, Any]:
    """One layer's prefill attention (store K/V + attend) per backend: time, TFLOP/s, extra memory.

    A step holds ``num_prompts`` fresh prompts of each length. FLOPs count the
    causal half only (``4 * Hq * D * L(L+1)/2`` per prompt, QK^T and PV), so
    ``fraction_of_matmul_peak`` compares with the measured dense-matmul ceiling.
    ``peak_MiB`` is the memory a call allocates beyond its inputs (CUDA only):
    the naive backend's ``L x L`` scores show up there. ``max_abs_diff`` is
    against the first backend that ran. A backend that cannot run here is
    listed with the reason; one that runs out of memory gets ``"oom"``.
    """
    from folovllm.attention.selector import flash_attention_unavailable, get_attn_backend

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_shape(
        [
            ("num_prompts", num_prompts),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
            *(("prompt_len", n) for n in prompt_lens),
        ]
    )
    skipped = {
        "flash_attn": flash_attention_unavailable(dev, dt),
        "triton": None if dev.type == "cuda" else "the interpreter on CPU is not a timing",
    }
    peak_tflops = measure_matmul_tflops(dev, dt)
    warmup, iters = (3, 10) if dev.type == "cuda" else (1, 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for n in prompt_lens:
        lens = [n] * num_prompts
        md = prefill_metadata_paged(lens, block_size, dev, gen)
        q = torch.randn(sum(lens), num_heads, head_dim, generator=gen, device=dev).to(dt)
        k, v = (torch.randn(sum(lens), num_kv_heads, head_dim, generator=gen, device=dev).to(dt) for _ in "kv")
        cache = torch.zeros(2, md.block_table.numel(), block_size, num_kv_heads, head_dim, dtype=dt, device=dev)
        flops = 4 * num_heads * head_dim * num_prompts * n * (n + 1) // 2
        row: dict[str, Any] = {"prompt_len": n, "num_prompts": num_prompts, "flops": flops}
        first = None
        for name in backends:
            if skipped.get(name):
                row[name] = {"skipped": skipped[name]}
                continue
            backend = get_attn_backend(name)
            built = backend.build(md, AttentionSpec.of(q, k))  # once per step in the engine, so outside the timing

            def step() -> torch.Tensor:
                return backend.forward(q, k, v, cache, built, head_dim**-0.5)

            try:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    base = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                out = step()
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None
                seconds = median_time_s(step, dev, warmup, iters)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row[name] = "oom"
                continue
            first = out if first is None else first
            row[name] = {
                "time_us": seconds * 1e6,
                "TFLOPs": flops / seconds / 1e12,
                "fraction_of_matmul_peak": flops / seconds / 1e12 / peak_tflops,
                "peak_MiB": peak,
                "max_abs_diff": (out.float() - first.float()).abs().max().item(),
            }
            del out
        rows.append(row)
    return {
        "benchmark": "prefill_attention",
        **provenance(dev, "none (kernel only)", dt),
        "milestone": "M4",
        "workload": {
            "prompt_lens": list(prompt_lens),
            "num_prompts": num_prompts,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "block_size": block_size,
        },
        "matmul_TFLOPs": peak_tflops,
        "backends": list(backends),
        "results": rows,
    }


def _chunk_batch(
    chunk_len: int, context_len: int, num_decodes: int, block_size: int, device: torch.device, generator: torch.Generator
) -> AttentionMetadata:
    """One prompt chunk of ``chunk_len`` tokens after ``context_len`` cached ones, then ``num_decodes`` decode rows
    over ``context_len + chunk_len`` tokens each; every sequence's blocks at random places."""
    q_lens = [chunk_len] + [1] * num_decodes
    seq_lens = [context_len + chunk_len] * (1 + num_decodes)
    blocks = cdiv(seq_lens[0], block_size)
    physical = torch.randperm(blocks * len(q_lens), generator=generator, device=device).to(torch.int32)
    block_table = physical.view(len(q_lens), blocks)
    return AttentionMetadata(
        query_start_loc=torch.tensor(prefix_sums(q_lens), dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table,
        slot_mapping=None,
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )


def _gpu_time_s(fn, device: torch.device) -> tuple[float, str]:
    """GPU time of one call (replayed from a CUDA graph), else CUDA events around an eager call, else wall clock."""
    if device.type == "cuda":
        try:
            return graph_time_s([fn], device), "cuda graph"
        except RuntimeError:  # not capturable: time it eagerly (includes the launch)
            torch.cuda.synchronize(device)
            return median_time_s(fn, device), "events"
    return median_time_s(fn, device, warmup=0, iters=1), "wall clock (interpreter)"


def bench_chunk_attention(
    chunk_lens: list[int],
    context_lens: list[int],
    num_decodes: list[int] | None = None,
    num_heads: int = 16,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
    num_splits: list[int] | None = None,
) -> dict[str, Any]:
    """Attention of a chunked-prefill step (M5): the paged kernel against FA2 on the same chunk.

    A chunk of ``chunk_len`` queries attends over ``context_len`` cached tokens plus itself. The paged
    kernel reads that context through the block table, beside ``num_decodes`` decode rows in the same
    launch (a mixed step). FA2 (PyTorch's varlen kernel, bottom-right causal) gets the chunk alone with
    its context already gathered into contiguous K/V, which the engine would have to copy first (not
    timed): the comparison favours FA2. FLOPs count the visible (query, key) pairs of the chunk, QK^T
    and PV: ``4 * Hq * D * (chunk * context + chunk * (chunk + 1) / 2)``; decode rows are not counted.
    ``max_abs_diff`` compares the chunk's rows of both with the naive reference (fp32). Each of
    ``num_splits`` times the paged kernel again with that many context slices forced (``by_splits``), beside
    the count the planner picks (``triton.num_splits``), so one run shows what split-K does to a chunk.
    """
    from folovllm.attention.backends.triton_paged import build_paged_metadata, paged_attend
    from folovllm.attention.selector import flash_attention_unavailable

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    num_decodes = num_decodes or [0]
    _check_shape(
        [("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("block_size", block_size),
         *(("chunk_len", n) for n in chunk_lens)]
    )  # fmt: skip
    for name, values in (("context_len", context_lens), ("num_decodes", num_decodes)):
        if any(not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"{name} must be integers >= 0, got {values!r}")
    if any(not isinstance(s, int) or not 1 <= s <= MAX_SPLITS for s in num_splits or []):
        raise ValueError(f"num_splits must be integers in [1, {MAX_SPLITS}], got {num_splits!r}")
    fa2_missing = flash_attention_unavailable(dev, dt)
    peak_tflops = measure_matmul_tflops(dev, dt)
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = head_dim**-0.5
    spec = AttentionSpec(num_heads, num_kv_heads, head_dim, dt)
    rows = []
    for chunk, ctx, decodes in itertools.product(chunk_lens, context_lens, num_decodes):
        md = _chunk_batch(chunk, ctx, decodes, block_size, dev, gen)
        q = torch.randn(md.num_tokens, num_heads, head_dim, generator=gen, device=dev).to(dt)
        cache = torch.randn(2, md.block_table.numel(), block_size, num_kv_heads, head_dim, generator=gen, device=dev)
        cache = cache.to(dt)
        paged = build_paged_metadata(md, spec)  # once per step
        out = paged_attend(q, cache, paged, scale)
        k_all, v_all = gather_paged_kv(cache, md.block_table[:1], ctx + chunk)
        lens = md.seq_lens[:1], md.query_start_loc[1:2]
        reference = attend_padded(q[None, :chunk], k_all, v_all, lens[1], lens[0], scale)[0]
        flops = 4 * num_heads * head_dim * (chunk * ctx + chunk * (chunk + 1) // 2)
        seconds, timing = _gpu_time_s(lambda: paged_attend(q, cache, paged, scale), dev)
        row: dict[str, Any] = {
            "chunk_len": chunk, "context_len": ctx, "num_decodes": decodes, "flops": flops, "timing": timing,
            "triton": {"time_us": seconds * 1e6, "TFLOPs": flops / seconds / 1e12, "grid": list(paged.plan.grid),
                       "num_splits": paged.plan.num_splits,
                       "programs_before_m5": md.num_seqs * cdiv(chunk, paged.plan.q_tile),  # seqs x longest-query tiles
                       "max_abs_diff": (out[:chunk].float() - reference.float()).abs().max().item()},
        }  # fmt: skip
        for splits in num_splits or []:
            forced = build_paged_metadata(md, spec, num_splits=splits)
            s_seconds, _ = _gpu_time_s(lambda: paged_attend(q, cache, forced, scale), dev)
            row.setdefault("by_splits", {})[str(splits)] = {
                "time_us": s_seconds * 1e6, "TFLOPs": flops / s_seconds / 1e12,
                "max_abs_diff_vs_planned": (paged_attend(q, cache, forced, scale) - out).abs().max().item(),
            }  # fmt: skip
        if fa2_missing:
            row["flash_attn"] = {"skipped": fa2_missing}
        else:
            k, v = k_all[0].contiguous(), v_all[0].contiguous()
            cu_q = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, ctx + chunk], dtype=torch.int32, device=dev)

            def fa2() -> torch.Tensor:
                from torch.nn.attention.varlen import varlen_attn

                return varlen_attn(q[:chunk], k, v, cu_q, cu_k, chunk, ctx + chunk, scale=scale, window_size=(-1, 0))

            fa_seconds, _ = _gpu_time_s(fa2, dev)
            row["flash_attn"] = {
                "time_us": fa_seconds * 1e6,
                "TFLOPs": flops / fa_seconds / 1e12,
                "max_abs_diff": (fa2().float() - reference.float()).abs().max().item(),
            }
            row["triton_vs_flash_attn"] = fa_seconds / seconds
        row["triton"]["fraction_of_matmul_peak"] = row["triton"]["TFLOPs"] / peak_tflops
        rows.append(row)
    return {
        "benchmark": "chunk_attention",
        **provenance(dev, "none (kernel only)", dt),
        "milestone": "M5",
        "workload": {
            "chunk_lens": list(chunk_lens),
            "context_lens": list(context_lens),
            "num_decodes": list(num_decodes),
            "num_splits": list(num_splits or []),
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "block_size": block_size,
        },
        "matmul_TFLOPs": peak_tflops,
        "results": rows,
    }
