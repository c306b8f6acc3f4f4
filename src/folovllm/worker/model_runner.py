"""Turns a ``SchedulerOutput`` into one forward pass and one sampling call.

It flattens every scheduled request's new tokens into one ragged batch
(``input_ids[T]``, ``positions[T]``), maps each token to its KV slot through
the request's block table, runs the model once, and samples the last token of
every request that finished its known tokens. It makes no policy decisions.
"""
from __future__ import annotations

import time

import torch

from folovllm.attention.backends.abstract import AttentionMetadata, AttentionSpec
from folovllm.attention.layer import bind_attention, prefill_metadata
from folovllm.attention.selector import get_attn_backend, resolve_attention_backend
from folovllm.config import CacheConfig, EngineConfig
from folovllm.core.sched.output import SchedulerOutput
from folovllm.model_executor.model_loader import LoadedModel
from folovllm.outputs import ModelRunnerOutput
from folovllm.sample.metadata import SamplingMetadata
from folovllm.sample.sampler import Sampler
from folovllm.utils import prefix_sums


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        self.max_model_len = loaded.max_model_len
        self.device = config.device
        self.dtype = config.model_config.dtype
        self.block_size = config.cache_config.block_size
        self.backend_name = resolve_attention_backend(config)
        self.backend = get_attn_backend(self.backend_name)
        layer = self.model.attention_layers()[0]
        self.attn_spec = AttentionSpec(layer.num_heads, layer.num_kv_heads, layer.head_dim, self.dtype)
        if not self.backend.needs_kv_cache:  # so the memory profiling pass measures this backend's peak
            bind_attention(self.model.attention_layers(), self.backend)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []

    # ---- KV memory -------------------------------------------------------------
    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the attention layers."""
        layer = self.model.attention_layers()[0]
        return len(self.model.attention_layers()), layer.num_kv_heads, layer.head_dim

    def kv_bytes_per_token(self) -> int:
        num_layers, num_kv_heads, head_dim = self.kv_shape
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def kv_cache_budget_bytes(self) -> int:
        """Bytes for KV blocks: fixed by ``kv_cache_memory``, a CPU default, or GPU profiling."""
        cache: CacheConfig = self.config.cache_config
        if cache.kv_cache_memory is not None:
            return cache.kv_cache_memory
        if self.device.type != "cuda":
            return CacheConfig.DEFAULT_CPU_KV_BYTES
        return self._profile_free_gpu_bytes(cache.gpu_memory_utilization)

    @torch.inference_mode()
    def _profile_free_gpu_bytes(self, utilization: float) -> int:
        """Run a dummy forward at the token budget; KV gets what weights and peak activations leave."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        budget = self.config.scheduler_config.max_num_batched_tokens
        seq_len = min(self.max_model_len, budget)
        lens = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
        self._dummy_forward(lens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.mem_get_info(self.device)[1]
        free = int(total * utilization) - peak
        if free <= 0:
            raise ValueError(f"gpu_memory_utilization={utilization} leaves no memory for the KV cache "
                             f"(weights + peak activations = {peak / 2**30:.2f} GiB)")
        return free

    def _dummy_forward(self, seq_lens: list[int]) -> None:
        total = sum(seq_lens)
        ids = torch.zeros(total, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        common = prefill_metadata(seq_lens, self.device)
        hidden = self.model(ids, pos, self.model.attention_layers()[0].backend.build(common, self.attn_spec))
        self.model.compute_logits(hidden[-len(seq_lens):])

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer and bind it."""
        num_layers, num_kv_heads, head_dim = self.kv_shape
        self.kv_caches = [torch.zeros(2, num_blocks, self.block_size, num_kv_heads, head_dim,
                                      dtype=self.dtype, device=self.device) for _ in range(num_layers)]
        bind_attention(self.model.attention_layers(), self.backend, self.kv_caches)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, K and V) before they are written."""
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    # ---- one step ----------------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step into ``input_ids[T]``, ``positions[T]`` and the step's common attention metadata."""
        reqs = sched.scheduled
        query_lens = [r.num_tokens for r in reqs]
        seq_lens = [r.start_pos + r.num_tokens for r in reqs]
        input_ids = torch.tensor([t for r in reqs for t in r.token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(r.start_pos, r.start_pos + r.num_tokens) for r in reqs])
        query_start_loc = torch.tensor(prefix_sums(query_lens), dtype=torch.int32)
        block_table = slot_mapping = None
        if self.kv_caches:
            width = max(len(r.block_ids) for r in reqs)
            block_table = torch.zeros(len(reqs), width, dtype=torch.int32)
            for b, r in enumerate(reqs):
                block_table[b, :len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
            req_idx = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(query_lens))
            slot_mapping = (block_table[req_idx, positions // self.block_size].long() * self.block_size
                            + positions % self.block_size)
        dev = self.device
        md = AttentionMetadata(
            query_start_loc=query_start_loc.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_table=None if block_table is None else block_table.to(dev, non_blocking=True),
            slot_mapping=None if slot_mapping is None else slot_mapping.to(dev, non_blocking=True),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            block_size=self.block_size if self.kv_caches else 0)
        return input_ids.to(dev, non_blocking=True), positions.to(dev, non_blocking=True), md

    def _sampling_metadata(self, sched: SchedulerOutput, rows: list[int]) -> SamplingMetadata:
        params, generators = [], {}
        for row, b in enumerate(rows):
            r = sched.scheduled[b]
            params.append(r.sampling_params)
            seed = r.sampling_params.seed
            if seed is not None and not r.sampling_params.greedy:
                if r.req_id not in self.generators:
                    self.generators[r.req_id] = torch.Generator(device=self.device).manual_seed(seed)
                generators[row] = self.generators[r.req_id]
        return SamplingMetadata.from_params(params, generators, self.device)

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in sched.finished_req_ids:
            self.generators.pop(req_id, None)
        if sched.is_empty:
            return ModelRunnerOutput([], [])
        t0 = time.perf_counter()
        if sched.block_copies:
            self.copy_blocks(sched.block_copies)
        input_ids, positions, common = self.prepare_inputs(sched)
        rows = [b for b, r in enumerate(sched.scheduled) if r.sample]
        last_token = common.query_start_loc[1:] - 1
        attn_metadata = self.backend.build(common, self.attn_spec)
        t1 = time.perf_counter()
        hidden = self.model(input_ids, positions, attn_metadata)
        tokens: list[int | None] = [None] * len(sched.scheduled)
        logprobs: list[dict[int, float] | None] = [None] * len(sched.scheduled)
        if rows:
            logits = self.model.compute_logits(hidden[last_token[rows]])
            out = self.sampler(logits, self._sampling_metadata(sched, rows))
            sampled = out.sampled_token_ids.tolist()
            for row, b in enumerate(rows):
                tokens[b] = sampled[row]
            if out.logprobs is not None:
                self._collect_logprobs(sched, rows, sampled, out, logprobs)
        t2 = time.perf_counter()
        return ModelRunnerOutput(tokens, logprobs, prepare_time=t1 - t0, forward_time=t2 - t1)

    @staticmethod
    def _collect_logprobs(sched: SchedulerOutput, rows: list[int], sampled: list[int], out,
                          logprobs: list) -> None:
        """{token_id: logprob} for the sampled token plus the top-``logprobs`` alternatives."""
        sampled_lp = out.logprobs.tolist()
        top_ids = out.topk_token_ids.tolist() if out.topk_token_ids is not None else None
        top_lp = out.topk_logprobs.tolist() if out.topk_logprobs is not None else None
        for row, b in enumerate(rows):
            k = sched.scheduled[b].sampling_params.logprobs
            if k is None:
                continue
            entry = {}
            if top_ids is not None:
                entry.update(zip(top_ids[row][:k], top_lp[row][:k]))
            entry[sampled[row]] = sampled_lp[row]
            logprobs[b] = entry
