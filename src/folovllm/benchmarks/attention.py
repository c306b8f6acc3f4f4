"""Decode attention alone: the Triton paged kernel against the naive gather + matmul path.

Decode attention reads every cached K/V byte of every sequence once per step
and does almost no math per byte, so its natural unit is GB/s, compared with
``measure_copy_bandwidth`` of the same card.
"""
from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.attention.backends.naive import attend_padded, gather_paged_kv
from folovllm.attention.ops.triton_paged_attn import paged_attention
from folovllm.benchmarks.hardware import median_time_s


def decode_metadata(num_seqs: int, context_len: int, block_size: int,
                    device: torch.device, generator: torch.Generator) -> AttentionMetadata:
    """One decode token per sequence, each over ``context_len`` tokens in randomly placed blocks."""
    blocks_per_seq = -(-context_len // block_size)
    block_table = torch.randperm(num_seqs * blocks_per_seq, generator=generator, device=device)
    block_table = block_table.view(num_seqs, blocks_per_seq).to(torch.int32)
    last = context_len - 1
    slot_mapping = block_table[:, last // block_size].long() * block_size + last % block_size
    return AttentionMetadata(
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), context_len, dtype=torch.int32, device=device),
        block_table=block_table, slot_mapping=slot_mapping,
        query_lens_cpu=[1] * num_seqs, seq_lens_cpu=[context_len] * num_seqs)


def bench_paged_decode(num_seqs: int, context_len: int, num_heads: int, num_kv_heads: int,
                       head_dim: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str, num_splits: int | None = None,
                       warmup: int | None = None, iters: int | None = None) -> dict:
    """Time one decode step of attention (median, no K/V store) for both backends.

    ``kv_bytes_read`` counts the K and V of every context token once: the least
    any decode kernel must read, so ``achieved_GBps`` is a lower bound on the
    real traffic. ``max_abs_diff`` checks the two outputs agree.
    """
    device = torch.device(device)
    for name, value in (("num_seqs", num_seqs), ("context_len", context_len), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("block_size", block_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if warmup is None:
        warmup = 10 if device.type == "cuda" else 1
    if iters is None:
        iters = 50 if device.type == "cuda" else 3
    gen = torch.Generator(device=device).manual_seed(0)
    md = decode_metadata(num_seqs, context_len, block_size, device, gen)
    num_blocks = md.block_table.numel()
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim,
                           generator=gen, device=device).to(dtype)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen, device=device).to(dtype)
    scale = head_dim**-0.5
    ones = torch.ones(num_seqs, dtype=torch.int32, device=device)

    def triton_step() -> torch.Tensor:
        return paged_attention(q, kv_cache, md, scale, num_splits=num_splits)

    def naive_step() -> torch.Tensor:
        k, v = gather_paged_kv(kv_cache, md.block_table, context_len)
        return attend_padded(q[:, None], k, v, ones, md.seq_lens, scale)[:, 0].to(dtype)

    max_abs_diff = (triton_step().float() - naive_step().float()).abs().max().item()
    kv_bytes = 2 * num_seqs * context_len * num_kv_heads * head_dim * kv_cache.element_size()
    time_s = median_time_s(triton_step, device, warmup, iters)
    naive_s = median_time_s(naive_step, device, warmup, iters)
    return {
        "num_seqs": num_seqs, "context_len": context_len, "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "head_dim": head_dim, "block_size": block_size,
        "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "num_splits": "auto" if num_splits is None else num_splits,
        "kv_bytes_read": kv_bytes,
        "time_us": time_s * 1e6, "achieved_GBps": kv_bytes / time_s / 1e9,
        "naive_time_us": naive_s * 1e6, "naive_GBps": kv_bytes / naive_s / 1e9,
        "speedup_vs_naive": naive_s / time_s, "max_abs_diff": max_abs_diff,
    }


def bench_attention_sweep(num_seqs: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int,
                          head_dim: int, block_size: int, dtype: str, device: str | None) -> dict:
    """``folovllm bench attention``: the decode kernel over a grid of batch sizes and context lengths."""
    from folovllm.benchmarks.common import provenance
    from folovllm.benchmarks.hardware import measure_copy_bandwidth
    from folovllm.config import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    copy_gbps = measure_copy_bandwidth(dev)
    rows = []
    for n in num_seqs:
        for ctx in context_lens:
            row = bench_paged_decode(n, ctx, num_heads, num_kv_heads, head_dim, block_size, dt, dev)
            row["fraction_of_copy_bw"] = row["achieved_GBps"] / copy_gbps
            rows.append(row)
    return {"benchmark": "attention", **provenance(dev, "paged-decode-kernel", dt), "copy_GBps": copy_gbps,
            "results": rows}
