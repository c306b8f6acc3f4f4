"""Naive attention: PyTorch matmul + softmax with an explicit causal mask.

It gathers each sequence's K/V through its block table into a padded batch
(a copy of the blocks in use, not of the whole cache) and runs one batched
matmul for all sequences. Decode rows and prefill rows are handled as two
groups so one long prompt does not pad every decode row to its length.
This is the reference every faster backend is tested against.
"""
from __future__ import annotations

import torch

from folovllm.attention.backends.abstract import (AttentionBackend, AttentionMetadata,
                                                   store_kv_reference)


def gather_paged_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
                    max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of each sequence as ``[B, L, Hkv, D]`` (L = whole blocks covering max_seq_len)."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = -(-max_seq_len // block_size)
    blocks = block_table[:, :num_blocks].long()
    offsets = torch.arange(block_size, device=blocks.device)
    slots = (blocks[:, :, None] * block_size + offsets).reshape(blocks.shape[0], -1)
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    return flat[0][slots], flat[1][slots]


def _pad_rows(x: torch.Tensor, starts: list[int], lens: list[int], width: int) -> torch.Tensor:
    """Ragged rows ``x[starts[b]:starts[b]+lens[b]]`` as ``[B, width, ...]`` (padding repeats the last row; it is masked later)."""
    start = torch.tensor(starts, device=x.device)[:, None]
    last = torch.tensor(lens, device=x.device)[:, None] - 1
    cols = torch.arange(width, device=x.device)[None, :]
    return x[start + torch.minimum(cols, last)]


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over padded rows: ``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hkv, D]``.

    Query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - q_lens[b] + i``
    and may see keys ``j <= position``. Computed in fp32.
    """
    bsz, lq, num_heads, head_dim = q.shape
    lk, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qf = q.float().view(bsz, lq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)
    vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, Lk]
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(lq, device=q.device)[None, :]
    k_pos = torch.arange(lk, device=q.device)
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)  # [B, Hkv, G, Lq, D]
    return out.permute(0, 3, 1, 2, 4).reshape(bsz, lq, num_heads, head_dim)


class NaiveAttentionBackend(AttentionBackend):
    name = "naive"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if kv_cache is not None:
            store_kv_reference(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)
        starts = _starts(metadata.query_lens_cpu)
        decode = [b for b, n in enumerate(metadata.query_lens_cpu) if n == 1]
        prefill = [b for b, n in enumerate(metadata.query_lens_cpu) if n > 1]
        for rows in (decode, prefill):
            if rows:
                self._attend_group(rows, starts, q, k, v, kv_cache, metadata, scale, out)
        return out

    @staticmethod
    def _attend_group(rows: list[int], starts: list[int], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, kv_cache: torch.Tensor | None, md: AttentionMetadata,
                      scale: float, out: torch.Tensor) -> None:
        q_lens = [md.query_lens_cpu[b] for b in rows]
        s_lens = [md.seq_lens_cpu[b] for b in rows]
        row_starts = [starts[b] for b in rows]
        qp = _pad_rows(q, row_starts, q_lens, max(q_lens))
        if kv_cache is None:
            kp = _pad_rows(k, row_starts, s_lens, max(s_lens))
            vp = _pad_rows(v, row_starts, s_lens, max(s_lens))
        else:
            kp, vp = gather_paged_kv(kv_cache, md.block_table[rows], max(s_lens))
        dev = q.device
        res = attend_padded(qp, kp, vp, torch.tensor(q_lens, device=dev),
                            torch.tensor(s_lens, device=dev), scale).to(q.dtype)
        token_idx = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(row_starts, q_lens)])
        valid = torch.cat([torch.arange(n, device=dev) + i * res.shape[1] for i, n in enumerate(q_lens)])
        out[token_idx] = res.reshape(-1, *res.shape[2:])[valid]


def _starts(query_lens: list[int]) -> list[int]:
    starts, acc = [], 0
    for n in query_lens:
        starts.append(acc)
        acc += n
    return starts
