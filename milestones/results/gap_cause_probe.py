"""#15, twenty-first session: what, after the captures, slows an engine's decode graph (``gap_capture_probe.py``)?

``gap_capture_probe.py`` timed the one-sequence decode graph of an engine with M5's graph mode at 4.15 ms a replay
after its capture and 4.27 ms once the engine was ready; the attention warm-up is what runs in between. Here one
engine per process is built and the same replay is timed at checkpoints, each after one action:

- ``full-nowarm``: M5's graph mode, the warm-up skipped at build; then a new small Triton kernel, a new Triton kernel
  with a large shared-memory tile, a 1 GiB allocation, the warm-up's launches (twice), and ``empty_cache``.
- ``full-warmfirst``: M5's graph mode with the warm-up run before the graphs are captured (and again after, as usual).
- ``m4``: M4's decode-only graphs, as built; then the new kernels and the warm-up.
- ``full-bisect``: as ``full-nowarm``, then the warm-up's launches one at a time (``paged_attention_variants``);
  ``full-bisect-reverse`` in reverse order.
- ``m4-modules``: M4's decode-only graphs, then kernel code loaded in batches: bf16 matmuls of 16 new shapes each
  (cuBLAS loads each kernel on first use), then 8 new variants each of a Triton kernel with a long unrolled body;
  the replay timed after each batch: does loading code alone flip a fast engine?
- ``full-serve`` (bf16, M5's graph mode), ``m7-serve`` (GPTQ on M7's preset) and ``m4-serve`` (M4): the engine as
  built, 40 batch-1 decode steps of a 128-token prompt timed, then the warm-up's variants launched, and 40 steps
  again. (Stage ``gapfix`` ran these at 03df784, whose warm-up compiled the variants without launching them.)
- ``m7-servebisect``: GPTQ on M7's preset; the decode replay timed after one replay of the smallest mixed-step graph,
  then after each of a request's first engine steps.

The replay reads whatever the persistent input buffers hold: padding (no context) after the captures, the last
real step's sequence after serving. A replay after serving therefore also attends over a real context.

Each checkpoint also records the context's stack limit (``cuCtxGetLimit``): a kernel needing more local memory per
thread than any loaded before makes the driver raise it. ``full-bisect`` then sets the limit back to its value at
``ready`` and times the replay again. The JSON lists every compiled variant of the paged-attention kernel with its
registers, spills and local memory per thread.

    python3 milestones/results/gap_cause_probe.py MODE OUT.json
"""

from __future__ import annotations

import ctypes
import json
import sys
from unittest import mock

import torch
import triton
import triton.language as tl
from gap_capture_probe import REPLAYS, replay_ms  # the same replay timing (this script's folder is on sys.path)
from m7_gaps import timed_decode_steps

from folovllm import LLM, SamplingParams
from folovllm.attention.ops import paged_attn
from folovllm.benchmarks.common import provenance
from folovllm.worker import model_runner
from folovllm.worker.cuda_graph import CUDAGraphRunner

MODEL = "random:qwen3-8b"
ENGINE = dict(max_num_seqs=1, max_model_len=512, kv_cache_memory=2**30)


@triton.jit
def _scale_kernel(X, N, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) * SCALE, mask=offs < N)


@triton.jit
def _tile_kernel(A, B, C, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(A + r[:, None] * BLOCK + r[None, :])
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    tl.store(C + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


_CUDA = ctypes.CDLL("libcuda.so.1")
_STACK_SIZE, _LOCAL_SIZE_BYTES, _NUM_REGS = 0, 3, 4  # CU_LIMIT_STACK_SIZE, CU_FUNC_ATTRIBUTE_*


def stack_limit() -> int:
    value = ctypes.c_size_t()
    assert _CUDA.cuCtxGetLimit(ctypes.byref(value), _STACK_SIZE) == 0
    return value.value


def set_stack_limit(value: int) -> None:
    assert _CUDA.cuCtxSetLimit(_STACK_SIZE, ctypes.c_size_t(value)) == 0


def compiled_variants(fn) -> list[dict]:
    """Registers, spills and local bytes per thread of every compiled variant of a Triton kernel."""
    rows = []
    for cache in fn.device_caches.values():
        for kernel in cache[0].values():
            local = ctypes.c_int(-1)
            if getattr(kernel, "function", None):
                _CUDA.cuFuncGetAttribute(ctypes.byref(local), _LOCAL_SIZE_BYTES, ctypes.c_void_p(kernel.function))
            constants = getattr(getattr(kernel, "src", None), "constants", {})
            rows.append({
                "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                "local_bytes": local.value, "shared": kernel.metadata.shared,
                "constants": {str(k): v for k, v in constants.items() if isinstance(v, (int, bool, str))},
            })  # fmt: skip
    return rows


@triton.jit
def _long_kernel(X, SEED: tl.constexpr, LENGTH: tl.constexpr):
    x = tl.load(X + tl.arange(0, 128))
    for i in tl.static_range(LENGTH):
        x = x * (1.0 + SEED * 1e-3) + i
    tl.store(X + tl.arange(0, 128), x)


def load_code(runner: CUDAGraphRunner, times: dict[str, float]) -> None:
    """cuBLAS kernels for 64 matmul shapes, then 32 Triton variants of ~1,000 instructions each, in batches."""
    for batch in range(4):
        for m in range(1 + 16 * batch, 17 + 16 * batch):
            a = torch.ones(m * 37, 4096 + 64 * m, device="cuda", dtype=torch.bfloat16)
            b = torch.ones(4096 + 64 * m, 96 * m, device="cuda", dtype=torch.bfloat16)
            a @ b
        times[f"after_cublas_shapes_{16 * (batch + 1)}"] = replay_ms(runner)
    x = torch.ones(128, device="cuda")
    for batch in range(4):
        for seed in range(8 * batch, 8 * batch + 8):
            _long_kernel[(1,)](x, SEED=seed, LENGTH=1000)
        times[f"after_triton_variants_{8 * (batch + 1)}"] = replay_ms(runner)


def decode_step_ms(llm: LLM, steps: int = 40) -> float:
    """Wall time per engine step of one 128-token request's decode (after its prefill and 8 warm steps)."""
    engine = llm.llm_engine
    elapsed = timed_decode_steps(engine, "probe", max_tokens=steps + 16, warm_steps=9, steps=steps)
    engine.abort_request(["probe"])
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def serve_bisect(llm: LLM, runner: CUDAGraphRunner, times: dict[str, float]) -> None:
    """The decode replay after a mixed-step graph's replay, then after each engine step of a request's start."""
    mixed = llm.llm_engine.model_runner.mixed_graphs
    mixed.replay(mixed.sizes[0])
    times["after_one_mixed_replay"] = replay_ms(runner)
    engine = llm.llm_engine
    prompt = torch.randint(0, 10000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("bisect", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=32, ignore_eos=True))
    times["after_add_request"] = replay_ms(runner)
    for i in range(1, 6):
        engine.step()
        torch.cuda.synchronize()
        times[f"after_step{i}"] = replay_ms(runner)
    engine.abort_request(["bisect"])
    while engine.has_unfinished_requests():
        engine.step()


def launch_variants() -> None:
    """The attention variants launched on block 0, as the warm-up did before it only compiled them."""
    r = HOLDER["runner"]
    for plan, q_len in paged_attn.paged_attention_variants(r.attn_spec, r.block_size, r.device):
        paged_attn.launch_on_block_zero(r.kv_caches[0], r.attn_spec, r.max_blocks_per_req, plan, q_len)


def new_small_kernel() -> None:
    x = torch.ones(4096, device="cuda")
    _scale_kernel[(4,)](x, 4096, SCALE=3.0, BLOCK=1024)


def new_large_smem_kernel() -> None:
    a = torch.ones(128, 128, device="cuda")  # fp32 operands of a 128 x 128 tl.dot: 128 KiB of shared memory
    c = torch.empty_like(a)
    _tile_kernel[(1,)](a, a, c, BLOCK=128, num_warps=8)


HOLDER: dict[str, object] = {}  # the engine's model runner, kept as it initializes its KV cache


def main(mode: str, out: str) -> None:
    times: dict[str, float] = {}
    real_capture, real_init = model_runner.capture_in_one_pool, model_runner.ModelRunner.initialize_kv_cache

    def init(self, num_blocks: int) -> None:
        HOLDER["runner"] = self
        real_init(self, num_blocks)

    def warm_first_capture(runners, largest_only: bool = False) -> None:
        if not largest_only:
            launch_variants()
        real_capture(runners, largest_only)

    patches = [mock.patch.object(model_runner.ModelRunner, "initialize_kv_cache", init)]
    if mode in ("full-nowarm", "full-bisect", "full-bisect-reverse"):
        patches.append(mock.patch.object(paged_attn, "warm_up_paged_attention", lambda *a, **k: 0))
    if mode == "full-warmfirst":
        patches.append(mock.patch.object(model_runner, "capture_in_one_pool", warm_first_capture))
    preset = {"milestone": "M4", "cudagraph_mode": "FULL"}
    if mode.startswith("m4"):
        preset = {"milestone": "M4"}
    if mode in ("m7-serve", "m7-servebisect"):
        preset = {"milestone": "M7", "quantization": "gptq"}
    for p in patches:
        p.start()
    llm = LLM(MODEL, **preset, **ENGINE)
    for p in patches:
        p.stop()
    runner = llm.llm_engine.model_runner.cuda_graphs
    stacks: dict[str, int] = {}
    times["ready"] = replay_ms(runner)
    stacks["ready"] = stack_limit()
    times["ready_again"] = replay_ms(runner)
    steps: dict[str, float] = {}
    if mode.endswith("-serve"):
        steps["as_built"] = decode_step_ms(llm)
        times["after_serving"] = replay_ms(runner)
        launch_variants()
        times["after_launched_variants"] = replay_ms(runner)
        steps["after_launched_variants"] = decode_step_ms(llm)
    if mode == "m4-modules":
        load_code(runner, times)
    if mode == "m7-servebisect":
        serve_bisect(llm, runner, times)
    if mode.startswith("full-bisect"):
        r = HOLDER["runner"]
        variants = paged_attn.paged_attention_variants(r.attn_spec, r.block_size, r.device)
        for plan, q_len in variants[::-1] if mode.endswith("reverse") else variants:
            paged_attn.launch_on_block_zero(r.kv_caches[0], r.attn_spec, r.max_blocks_per_req, plan, q_len)
            name = f"after_splits{plan.num_splits}_q{q_len}_search{int(plan.search)}_m{plan.block_m}_n{plan.block_n}"
            times[name] = replay_ms(runner)
            stacks[name] = stack_limit()
        set_stack_limit(stacks["ready"])
        stacks["reset"] = stack_limit()
        times["after_stack_limit_reset"] = replay_ms(runner)
    new_small_kernel()
    times["after_new_small_kernel"] = replay_ms(runner)
    new_large_smem_kernel()
    times["after_new_large_smem_kernel"] = replay_ms(runner)
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    times["after_alloc_1g"] = replay_ms(runner)
    del block
    launch_variants()
    times["after_warm_up"] = replay_ms(runner)
    launch_variants()
    times["after_warm_up_again"] = replay_ms(runner)
    torch.cuda.empty_cache()
    times["after_empty_cache"] = replay_ms(runner)
    stacks["end"] = stack_limit()
    result = {"probe": "gap_cause_probe", "mode": mode, **provenance(torch.device("cuda"), MODEL, torch.bfloat16),
              "engine": ENGINE, "replays": REPLAYS, "decode_graph_replay_ms": times, "decode_step_ms": steps,
              "stack_limit": stacks,
              "paged_attention_variants": compiled_variants(paged_attn._paged_attention_kernel)}  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(mode, {k: round(v, 4) for k, v in times.items()}, stacks, steps)
    print([{k: v for k, v in row.items() if k != "constants"} for row in result["paged_attention_variants"]])


if __name__ == "__main__":
    main(sys.argv[-2], sys.argv[-1])
