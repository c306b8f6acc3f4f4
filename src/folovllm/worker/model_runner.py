"""Turns a ``SchedulerOutput`` into one forward pass and one sampling call.

It flattens every scheduled request's new tokens into one ragged batch
(``input_ids[T]``, ``positions[T]``), maps each token to its KV slot through
the request's block table, runs the model once, and samples the last token of
every request that finished its known tokens. It makes no policy decisions.

The host side is kept lean (M4 part 2): inputs are written into persistent
buffers and sent with one copy each; block tables are updated from the
scheduler's changes; steps replay a CUDA graph when one is captured (decode
steps by batch size; with ``cudagraph_mode="FULL"`` prefill chunks and mixed
steps by token count too);
the sampled ids come back with the step's only device-to-host copy.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from folovllm.attention.backends.abstract import AttentionMetadata, AttentionSpec
from folovllm.attention.layer import bind_attention, prefill_metadata
from folovllm.attention.selector import get_attn_backend, resolve_attention_backend
from folovllm.config import CacheConfig, EngineConfig
from folovllm.core.sched.output import SchedulerOutput
from folovllm.model_executor.compile import compile_model
from folovllm.model_executor.layers.custom_op import enable_fused_ops
from folovllm.model_executor.model_loader import LoadedModel
from folovllm.outputs import ModelRunnerOutput
from folovllm.sample.metadata import SamplingMetadata
from folovllm.sample.sampler import Sampler, SamplerOutput
from folovllm.utils import cdiv, to_device
from folovllm.worker.block_table import BlockTable
from folovllm.worker.buffers import CpuGpuBuffer
from folovllm.worker.cuda_graph import CUDAGraphRunner, capture_in_one_pool, capture_sizes, mixed_capture_sizes


@dataclass
class StepInFlight:
    """A launched step: its sampled ids are on their way to a pinned host tensor."""

    sched: SchedulerOutput
    rows: list[int]  # scheduled requests that sample, in sampling order
    tokens: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    sampler_output: SamplerOutput | None = None
    prepare_time: float = 0.0
    launched_at: float = 0.0
    started: torch.cuda.Event | None = None  # timing events, when the step is timed on the device
    device_time: float | None = None  # CPU: the forward and sampling ran before ``launch_step`` returned
    ended_at: float | None = None  # CPU, timed: when that was


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
        self.fused = config.model_config.fuse_kernels and self.device.type == "cuda"
        if self.fused:
            enable_fused_ops(self.model)
        if config.model_config.compilation_config:
            compile_model(self.model)
        self.sampler = Sampler()
        self.time_steps = config.scheduler_config.target_itl_ms is not None  # the cost model learns from them
        self._previous_end: torch.cuda.Event | float | None = None  # the last timed step's end (interval)
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self._allocate_buffers(config)
        self.cuda_graphs: CUDAGraphRunner | None = None  # decode steps, by batch size
        self.mixed_graphs: CUDAGraphRunner | None = None  # any step, by token count ("FULL")
        self.graph_memory_estimate = 0
        # Host buffers are pinned and copied without blocking: the next step may only overwrite them once
        # the copies that read them ran. With async scheduling the host runs a step ahead of the GPU,
        # so this event, recorded after a step's last such copy, is what the next step waits for.
        self._inputs_copied = torch.cuda.Event() if self.device.type == "cuda" else None
        self._last_sampled: torch.Tensor | None = None  # the previous step's token ids, on the device
        self._last_sampled_row: dict[str, int] = {}

    def _allocate_buffers(self, config: EngineConfig) -> None:
        sched = config.scheduler_config
        max_tokens, max_seqs = sched.max_num_batched_tokens, sched.max_num_seqs
        dev = self.device
        self.input_ids = CpuGpuBuffer(max_tokens, dtype=torch.int64, device=dev)
        self.positions = CpuGpuBuffer(max_tokens, dtype=torch.int64, device=dev)
        self.slot_mapping = CpuGpuBuffer(max_tokens, dtype=torch.int64, device=dev)
        self.query_start_loc = CpuGpuBuffer(max_seqs + 1, dtype=torch.int32, device=dev)
        self.seq_lens = CpuGpuBuffer(max_seqs, dtype=torch.int32, device=dev)
        self.logits_indices = CpuGpuBuffer(max_seqs, dtype=torch.int64, device=dev)
        self.max_blocks_per_req = cdiv(self.max_model_len, self.block_size)
        self.block_tables = BlockTable(max_seqs, self.max_blocks_per_req)
        self.block_table = CpuGpuBuffer(max_seqs, self.max_blocks_per_req, dtype=torch.int32, device=dev)
        # Sampled ids land in pinned host memory (a copy into pageable memory would block the host).
        # Two, because with async scheduling step n+1's copy is queued before step n's is read.
        pin = dev.type == "cuda"
        # The step's gathered block-table rows, staged in pinned memory too: one asynchronous copy.
        self._block_table_stage = torch.zeros(max_seqs * self.max_blocks_per_req, dtype=torch.int32, pin_memory=pin)
        self._sampled_host = [torch.zeros(max_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._sampled_flip = 0

    # ---- KV memory -------------------------------------------------------------
    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the attention layers."""
        return len(self.model.attention_layers()), self.attn_spec.num_kv_heads, self.attn_spec.head_dim

    def kv_bytes_per_token(self) -> int:
        num_layers, num_kv_heads, head_dim = self.kv_shape
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def uses_cuda_graphs(self) -> bool:
        return (
            self.device.type == "cuda"
            and not self.config.model_config.enforce_eager
            and self.config.cache_config.kv_layout != "none"
            and self.backend.supports_cuda_graphs
        )

    @property
    def uses_mixed_cuda_graphs(self) -> bool:
        return (
            self.uses_cuda_graphs
            and self.config.model_config.cudagraph_mode == "FULL"
            and self.backend.supports_mixed_cuda_graphs
        )

    @property
    def graph_capture_seconds(self) -> float:
        return sum(g.capture_seconds for g in (self.cuda_graphs, self.mixed_graphs) if g is not None)

    @property
    def graph_memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in (self.cuda_graphs, self.mixed_graphs) if g is not None)

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
        """Run a dummy forward at the token budget; KV gets what weights, peak activations and the
        CUDA graphs leave."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        budget = self.config.scheduler_config.max_num_batched_tokens
        seq_len = min(self.max_model_len, budget)
        lens = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
        self._dummy_forward(lens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.mem_get_info(self.device)[1]
        self.graph_memory_estimate = self._estimate_graph_memory() if self.uses_cuda_graphs else 0
        free = int(total * utilization) - peak - self.graph_memory_estimate
        if free <= 0:
            raise ValueError(
                f"gpu_memory_utilization={utilization} leaves no memory for the KV cache "
                f"(weights + peak activations = {peak / 2**30:.2f} GiB)"
            )
        return free

    def _estimate_graph_memory(self) -> int:
        """Capture the largest graph of each kind once over a one-block stand-in cache, measure, throw them away."""
        num_layers, num_kv_heads, head_dim = self.kv_shape
        stand_in = [
            torch.zeros(2, 1, self.block_size, num_kv_heads, head_dim, dtype=self.dtype, device=self.device)
            for _ in range(num_layers)
        ]
        bind_attention(self.model.attention_layers(), self.backend, stand_in)
        probes = self._make_graph_runners()
        capture_in_one_pool(probes, largest_only=True)
        for probe in probes:
            probe.release()
        del stand_in
        torch.cuda.empty_cache()
        return sum(probe.memory_bytes for probe in probes)

    def _dummy_forward(self, seq_lens: list[int]) -> None:
        total = sum(seq_lens)
        ids = torch.zeros(total, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        common = prefill_metadata(seq_lens, self.device)
        hidden = self.model(ids, pos, self.model.attention_layers()[0].backend.build(common, self.attn_spec))
        self.model.compute_logits(hidden[-len(seq_lens) :])

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer, bind it, capture graphs."""
        num_layers, num_kv_heads, head_dim = self.kv_shape
        self.kv_caches = [
            torch.zeros(2, num_blocks, self.block_size, num_kv_heads, head_dim, dtype=self.dtype, device=self.device)
            for _ in range(num_layers)
        ]
        bind_attention(self.model.attention_layers(), self.backend, self.kv_caches)
        if self.uses_cuda_graphs:
            runners = self._make_graph_runners()
            capture_in_one_pool(runners)
            self.cuda_graphs = runners[-1]
            self.mixed_graphs = runners[0] if len(runners) > 1 else None
        if self.device.type == "cuda" and self.backend.reads_paged_kernel:  # compile now, not mid-serving
            from folovllm.attention.ops.paged_attn import warm_up_paged_attention

            warm_up_paged_attention(self.kv_caches[0], self.attn_spec, self.max_blocks_per_req)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (every layer, K and V) before they are written."""
        src = to_device([s for s, _ in copies], torch.int64, self.device)
        dst = to_device([d for _, d in copies], torch.int64, self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    # ---- CUDA graphs -------------------------------------------------------------
    def _make_graph_runners(self) -> list[CUDAGraphRunner]:
        """[mixed steps by token count (with "FULL"),] decode steps by batch size."""
        sched = self.config.scheduler_config  # a decode step has at most one token per request, budget included
        sizes = capture_sizes(min(sched.max_num_seqs, sched.max_num_batched_tokens), sched.cuda_graph_sizes)
        decode = CUDAGraphRunner(sizes, self._graph_forward, self._graph_metadata, self._pad_decode_inputs, self.device)
        if not self.uses_mixed_cuda_graphs:
            return [decode]
        max_tokens = min(sched.max_num_batched_tokens, self.config.model_config.max_cudagraph_capture_size)
        mixed = CUDAGraphRunner(
            mixed_capture_sizes(max_tokens), self._graph_forward, self._mixed_graph_metadata, self._pad_mixed_inputs,
            self.device,
        )  # fmt: skip
        return [mixed, decode]

    def _capture_metadata(self, num_seqs: int, num_tokens: int, query_lens: list[int]):
        """Attention metadata over the persistent buffers' first rows, planned for these query lengths
        (the graph's bounds) and any context; the buffers' contents at capture time do not matter."""
        common = AttentionMetadata(
            query_start_loc=self.query_start_loc.gpu[: num_seqs + 1],
            seq_lens=self.seq_lens.gpu[:num_seqs],
            block_table=self.block_table.gpu[:num_seqs],
            slot_mapping=self.slot_mapping.gpu[:num_tokens],
            query_lens_cpu=query_lens,
            seq_lens_cpu=query_lens,
            block_size=self.block_size,
        )
        return self.backend.build_for_capture(common, self.attn_spec, self.max_model_len)

    def _graph_metadata(self, size: int):
        """A decode step of ``size`` sequences."""
        return self._capture_metadata(size, size, [1] * size)

    def _mixed_graph_metadata(self, size: int):
        """A step of ``size`` tokens in any number of sequences (as many as fit), any lengths."""
        num_seqs = min(size, self.config.scheduler_config.max_num_seqs)
        return self._capture_metadata(num_seqs, size, [size] + [0] * (num_seqs - 1))  # one query may hold them all

    def _graph_forward(self, size: int, metadata) -> torch.Tensor:
        return self.model(self.input_ids.gpu[:size], self.positions.gpu[:size], metadata)

    def _pad_tokens(self, start: int, size: int) -> None:
        """Tokens ``start .. size-1`` become padding (id 0 at position 0, stored nowhere: slot -1); the
        token buffers go to the device."""
        self.input_ids.np[start:size] = 0
        self.positions.np[start:size] = 0
        self.slot_mapping.np[start:size] = -1
        for buf in (self.input_ids, self.positions, self.slot_mapping):
            buf.copy_to_gpu(size)

    def _pad_decode_inputs(self, size: int, num_seqs: int = 0, num_tokens: int = 0) -> None:
        """Rows ``num_seqs .. size-1`` become padding (slot -1, context 0) and the buffers go to the device."""
        self._pad_tokens(num_seqs, size)
        self.seq_lens.np[num_seqs:size] = 0
        self.query_start_loc.np[: size + 1] = np.arange(size + 1)
        self.seq_lens.copy_to_gpu(size)
        self.query_start_loc.copy_to_gpu(size + 1)

    def _pad_mixed_inputs(self, size: int, num_seqs: int = 0, num_tokens: int = 0) -> None:
        """Tokens past ``num_tokens`` store nothing and belong to no sequence; sequences past
        ``num_seqs`` have no query and no context. Then the buffers go to the device."""
        max_seqs = min(size, self.config.scheduler_config.max_num_seqs)
        self._pad_tokens(num_tokens, size)
        self.seq_lens.np[num_seqs:max_seqs] = 0
        self.query_start_loc.np[num_seqs + 1 : max_seqs + 1] = num_tokens
        if num_seqs == 0:
            self.query_start_loc.np[0] = 0
        self.seq_lens.copy_to_gpu(max_seqs)
        self.query_start_loc.copy_to_gpu(max_seqs + 1)

    # ---- one step ----------------------------------------------------------------
    def prepare_inputs(
        self, sched: SchedulerOutput, graph: tuple[CUDAGraphRunner, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step into ``input_ids[T]``, ``positions[T]`` and the step's common attention metadata.

        Everything is computed with numpy into the persistent buffers, then copied
        once. ``graph`` (the captured graph the step replays, and its size) pads the
        buffers after the real rows.
        """
        reqs = sched.scheduled
        n = len(reqs)
        query_lens = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=n)
        starts = np.fromiter((r.start_pos for r in reqs), dtype=np.int64, count=n)
        num_tokens = int(query_lens.sum())
        qsl = self.query_start_loc.np
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1 : n + 1])
        if num_tokens == n:  # decode: one token per request
            self.input_ids.np[:n] = [r.token_ids[0] if r.token_ids else 0 for r in reqs]
            positions = starts
        else:
            self.input_ids.np[:num_tokens] = list(
                itertools.chain.from_iterable(
                    r.token_ids if len(r.token_ids) == r.num_tokens else [*r.token_ids, 0] for r in reqs
                )
            )
            req_of_token = np.repeat(np.arange(n), query_lens)
            positions = np.arange(num_tokens) - qsl[req_of_token] + starts[req_of_token]
        self.positions.np[:num_tokens] = positions
        self.seq_lens.np[:n] = starts + query_lens
        block_table = slot_mapping = None
        if self.kv_caches:
            block_table, slots = self._block_table_and_slots(sched, positions, query_lens, num_tokens)
            self.slot_mapping.np[:num_tokens] = slots
        size = num_tokens
        if graph is not None:
            runner, size = graph
            runner.pad_inputs(size, n, num_tokens)
        else:
            for buf in (self.input_ids, self.positions, self.slot_mapping):
                buf.copy_to_gpu(num_tokens)
            self.seq_lens.copy_to_gpu(n)
            self.query_start_loc.copy_to_gpu(n + 1)
        self._fill_in_flight_tokens(reqs)
        if self.kv_caches:
            slot_mapping = self.slot_mapping.gpu[:num_tokens]
        md = AttentionMetadata(
            query_start_loc=self.query_start_loc.gpu[: n + 1],
            seq_lens=self.seq_lens.gpu[:n],
            block_table=block_table,
            slot_mapping=slot_mapping,
            query_lens_cpu=query_lens.tolist(),
            seq_lens_cpu=self.seq_lens.np[:n].tolist(),
            block_size=self.block_size if self.kv_caches else 0,
        )
        return self.input_ids.gpu[:size], self.positions.gpu[:size], md

    def _fill_in_flight_tokens(self, reqs: list) -> None:
        """Async scheduling: a request's newest token may still be on the device, sampled by the step
        launched just before this one; copy it into this step's input ids there (no host round trip)."""
        waiting_for = [
            (self.query_start_loc.np[b + 1] - 1, r.req_id) for b, r in enumerate(reqs) if len(r.token_ids) < r.num_tokens
        ]
        if not waiting_for:
            return
        try:
            src = [self._last_sampled_row[rid] for _, rid in waiting_for]
        except KeyError as err:
            raise ValueError(f"request {err.args[0]!r} needs a token the previous step did not sample") from None
        dst = to_device([int(d) for d, _ in waiting_for], torch.int64, self.device)
        self.input_ids.gpu.index_copy_(0, dst, self._last_sampled[to_device(src, torch.int64, self.device)])

    def _block_table_and_slots(
        self, sched: SchedulerOutput, positions: np.ndarray, query_lens: np.ndarray, num_tokens: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The step's ``[num_seqs, width]`` block table (gathered rows, one copy) and each token's slot."""
        rows = self.block_tables.update(sched)
        n = len(rows)
        width = max(1, int(self.block_tables.num_blocks[rows].max()))
        stage = self._block_table_stage[: n * width].view(n, width)
        np.take(self.block_tables.table[:, :width], rows, axis=0, out=stage.numpy())
        token_rows = rows if num_tokens == n else np.repeat(rows, query_lens)
        slots = self.block_tables.table[token_rows, positions // self.block_size].astype(np.int64)
        slots = slots * self.block_size + positions % self.block_size
        gpu = self.block_table.gpu[:n, :width]
        gpu.copy_(stage, non_blocking=gpu.device.type == "cuda")
        return gpu, slots

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

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its tokens."""
        return self.finish_step(self.launch_step(sched))

    @torch.inference_mode()
    def launch_step(self, sched: SchedulerOutput) -> StepInFlight:
        """Queue one step's forward and sampling on the device; the host is free until ``finish_step``."""
        for req_id in sched.finished_req_ids:
            self.generators.pop(req_id, None)
        if sched.is_empty:
            if self.kv_caches:
                self.block_tables.update(sched)  # still forget finished requests' tables
            return StepInFlight(sched, [])
        t0 = time.perf_counter()
        if sched.block_copies:
            self.copy_blocks(sched.block_copies)
        reqs = sched.scheduled
        graph = self._graph_for(sched)
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()
        input_ids, positions, common = self.prepare_inputs(sched, graph)
        rows = [b for b, r in enumerate(reqs) if r.sample]
        sample_index = self._sample_index(common, rows)
        if self._inputs_copied is not None:
            self._inputs_copied.record()  # after the last copy from a persistent pinned buffer
        if graph is None:
            attn_metadata = self.backend.build(common, self.attn_spec)
        t1 = time.perf_counter()
        step = StepInFlight(sched, rows, prepare_time=t1 - t0, launched_at=t1)
        if self.time_steps and self.device.type == "cuda":
            step.started = torch.cuda.Event(enable_timing=True)
            step.started.record()
        if graph is not None:
            hidden = graph[0].replay(graph[1])[: common.num_tokens]
        else:
            hidden = self.model(input_ids, positions, attn_metadata)
        self._last_sampled_row = {}
        if rows:
            logits = self.model.compute_logits(hidden if sample_index is None else hidden[sample_index])
            params = [reqs[b].sampling_params for b in rows]
            if all(p.greedy and p.logprobs is None for p in params):  # the all-greedy fast path: no sort, no tensors
                sampled = logits.argmax(dim=-1)
            else:
                step.sampler_output = self.sampler(logits, self._sampling_metadata(sched, rows))
                sampled = step.sampler_output.sampled_token_ids
            self._last_sampled = sampled
            self._last_sampled_row = {reqs[b].req_id: row for row, b in enumerate(rows)}
            step.tokens = self._sampled_host[self._sampled_flip][: len(rows)]
            self._sampled_flip ^= 1
            step.tokens.copy_(sampled, non_blocking=True)
        if self.device.type == "cuda":
            step.done = torch.cuda.Event(enable_timing=step.started is not None)
            step.done.record()
        elif self.time_steps:
            step.ended_at = time.perf_counter()
            step.device_time = step.ended_at - t1
        return step

    def reset_step_timing(self) -> None:
        """Forget the last step (after made-up ones, e.g. calibration): the next is timed as a first step."""
        self._previous_end = None
        self._last_sampled_row = {}

    def _interval_since_previous(self, step: StepInFlight) -> float | None:
        """Seconds from the previous timed step's end to this one's, on the device's clock."""
        end = step.done if step.started is not None else step.ended_at
        if end is None:
            return None
        previous, self._previous_end = self._previous_end, end
        if previous is None:
            return None
        return previous.elapsed_time(end) / 1e3 if isinstance(end, torch.cuda.Event) else end - previous

    def finish_step(self, step: StepInFlight) -> ModelRunnerOutput:
        """Wait for a launched step's tokens (its only device-to-host copy) and hand them to the scheduler."""
        reqs = step.sched.scheduled
        tokens: list[int | None] = [None] * len(reqs)
        logprobs: list[dict[int, float] | None] = [None] * len(reqs)
        if step.done is not None:
            step.done.synchronize()
        if step.started is not None:
            step.device_time = step.started.elapsed_time(step.done) / 1e3
        out = ModelRunnerOutput(
            tokens,
            logprobs,
            prepare_time=step.prepare_time,
            device_time=step.device_time,
            forward_time=time.perf_counter() - step.launched_at if reqs else 0.0,
            step_interval=self._interval_since_previous(step),
        )
        if not step.rows:
            return out
        sampled = step.tokens.tolist()
        for row, b in enumerate(step.rows):
            tokens[b] = sampled[row]
        if step.sampler_output is not None and step.sampler_output.logprobs is not None:
            self._collect_logprobs(step.sched, step.rows, sampled, step.sampler_output, logprobs)
        return out

    def _graph_for(self, sched: SchedulerOutput) -> tuple[CUDAGraphRunner, int] | None:
        """The captured graph this step replays and its size, or None to run it eagerly.

        A decode step pads its batch to a decode graph; any other step pads its
        tokens to a mixed graph ("FULL"), which has room for every sequence the
        step can hold. Steps larger than every graph (and, in M4, prefills) run eagerly.
        """
        num_seqs, num_tokens = len(sched.scheduled), sched.num_scheduled_tokens
        if self.cuda_graphs is not None and num_tokens == num_seqs:
            size = self.cuda_graphs.padded_size(num_seqs)
            if size is not None:
                return self.cuda_graphs, size
        if self.mixed_graphs is not None:
            size = self.mixed_graphs.padded_size(num_tokens)
            if size is not None:
                return self.mixed_graphs, size
        return None

    def _sample_index(self, common: AttentionMetadata, rows: list[int]) -> torch.Tensor | None:
        """Where each sampled request's last token sits in the step's hidden states, on the device;
        None when that is every row in order (a decode step)."""
        if not rows or (len(rows) == common.num_seqs and common.num_tokens == common.num_seqs):
            return None
        idx = self.logits_indices
        idx.np[: len(rows)] = self.query_start_loc.np[np.asarray(rows) + 1] - 1
        return idx.copy_to_gpu(len(rows))

    @staticmethod
    def _collect_logprobs(sched: SchedulerOutput, rows: list[int], sampled: list[int], out, logprobs: list) -> None:
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
