"""Naive attention: PyTorch matmul + softmax with an explicit causal mask.

It gathers each sequence's K/V through its block table into a padded batch
(a copy of the blocks in use, not of the whole cache) and runs one batched
matmul for all sequences. Decode rows and prefill rows are handled as two
groups so one long prompt does not pad every decode row to its length.
This is the reference every faster backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from folovllm.attention.backends.abstract import AttentionBackend, AttentionMetadata, AttentionSpec
from folovllm.utils import cdiv, prefix_sums


def paged_slots(block_table: torch.Tensor, max_seq_len: int, block_size: int) -> torch.Tensor:
    """Flat cache slot of every position ``[B, L]`` (L = whole blocks covering max_seq_len)."""
    blocks = block_table[:, : cdiv(max_seq_len, block_size)].long()
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[:, :, None] * block_size + offsets).reshape(blocks.shape[0], -1)


def gather_paged_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of each sequence as ``[B, L, Hkv, D]``: a copy of the blocks in use only."""
    return _gather(kv_cache, paged_slots(block_table, max_seq_len, kv_cache.shape[2]))


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    return flat[0][slots], flat[1][slots]


def _ragged_index(starts: list[int], lens: list[int], device: torch.device) -> torch.Tensor:
    """Row indices ``[B, max(lens)]`` of ragged rows ``starts[b] .. starts[b]+lens[b]-1``.

    Padding repeats the last row; attention masks it out.
    """
    start = torch.tensor(starts, device=device)[:, None]
    last = torch.tensor(lens, device=device)[:, None] - 1
    cols = torch.arange(max(lens), device=device)[None, :]
    return start + torch.minimum(cols, last)


def attend_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
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


class _Group:
    """Index tensors for one group of sequences, built once per step and shared by all layers."""

    def __init__(self, rows: list[int], starts: list[int], md: AttentionMetadata, device: torch.device) -> None:
        q_lens = [md.query_lens_cpu[b] for b in rows]
        s_lens = [md.seq_lens_cpu[b] for b in rows]
        row_starts = [starts[b] for b in rows]
        self.q_lens = torch.tensor(q_lens, device=device)
        self.s_lens = torch.tensor(s_lens, device=device)
        self.q_index = _ragged_index(row_starts, q_lens, device)
        if md.block_table is None:  # no cache: each sequence attends over its own fresh K/V
            self.kv_index = _ragged_index(row_starts, s_lens, device)
        else:
            self.kv_index = paged_slots(md.block_table[torch.tensor(rows, device=device)], max(s_lens), md.block_size)
        offsets = torch.arange(sum(q_lens), device=device) - torch.repeat_interleave(
            self.q_lens.cumsum(0) - self.q_lens, self.q_lens
        )
        self.token_idx = torch.repeat_interleave(torch.tensor(row_starts, device=device), self.q_lens) + offsets
        self.padded_idx = (
            torch.repeat_interleave(torch.arange(len(rows), device=device) * max(q_lens), self.q_lens) + offsets
        )


@dataclass
class NaiveAttentionMetadata:
    """One step's index tensors: decode rows and prefill rows as two padded groups."""

    slot_mapping: torch.Tensor | None
    groups: list[_Group]


class NaiveAttentionBackend(AttentionBackend[NaiveAttentionMetadata]):
    name = "naive"

    def build(self, common: AttentionMetadata, spec: AttentionSpec) -> NaiveAttentionMetadata:
        """Decode rows and prefill rows apart, so one long prompt doesn't pad every decode row to its length."""
        starts = prefix_sums(common.query_lens_cpu)
        decode = [b for b, n in enumerate(common.query_lens_cpu) if n == 1]
        prefill = [b for b, n in enumerate(common.query_lens_cpu) if n > 1]
        device = common.seq_lens.device
        return NaiveAttentionMetadata(
            common.slot_mapping, [_Group(rows, starts, common, device) for rows in (decode, prefill) if rows]
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: NaiveAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in metadata.groups:
            if kv_cache is None:
                kp, vp = k[group.kv_index], v[group.kv_index]
            else:
                kp, vp = _gather(kv_cache, group.kv_index)
            res = attend_padded(q[group.q_index], kp, vp, group.q_lens, group.s_lens, scale).to(q.dtype)
            out[group.token_idx] = res.reshape(-1, *res.shape[2:])[group.padded_idx]
        return out
