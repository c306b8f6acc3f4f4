#!/usr/bin/env bash
# The exact commands behind milestones/results/*.json, run on the lent GPU box from a plain
# checkout (no install): `bash milestones/results/run_gpu.sh STAGE` with $OUT set, and
# FOLOVLLM_COMMIT set to the commit measured (the tree travels without .git).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gpu=$(python3 -c "import torch; from folovllm.benchmarks.common import gpu_slug; print(gpu_slug(torch.device('cuda')))")
bench() { python3 -m folovllm bench "$@"; }
case "$1" in
  check)
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_flash_attention.py 2>&1 | tail -5
    python3 - <<'PY'
from folovllm import LLM, SamplingParams
prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 10000 for j in range(50 + 40 * i)]} for i in range(8)]
params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
runs = {}
for name, kw in {"M2-naive": dict(milestone="M2"), "M3-naive": dict(milestone="M3", attention_backend="naive"),
                 "M3-triton": dict(milestone="M3"), "M4-flash_attn": dict(milestone="M4")}.items():
    llm = LLM("random:qwen3-0.6b", max_model_len=1024, kv_cache_memory=2 * 2**30, **kw)
    runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
for name, toks in runs.items():
    same = sum(a == b for x, y in zip(toks, runs["M2-naive"]) for a, b in zip(x, y))
    print(f"{name}: {same}/{sum(map(len, toks))} greedy tokens equal to M2-naive (bf16)")
PY
    ;;
  attention)
    bench attention --out "$OUT/M3-attention-$gpu.json" ;;
  latency)
    for m in qwen3-0.6b llama-3.2-1b; do
      bench latency --model random:$m --milestone M1 --input-len 128 512 2048 --output-len 128 \
        --out "$OUT/M1-$gpu-$m.json"
    done ;;
  m2)
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --subset 64 \
      --milestone M2 M2/static M2/sequential@2 --out "$OUT/M2-$gpu.json" > /dev/null ;;
  m3)
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --kv-cache-memory 4294967296 \
      --subset 64 --milestone M3 M3/naive M2 --out "$OUT/M3-$gpu.json" > /dev/null ;;
  m4)
    bench prefill --out "$OUT/M4-prefill-$gpu.json" > /dev/null
    bench latency --model random:qwen3-0.6b --milestone M4 --input-len 512 2048 8192 --output-len 32 \
      --max-model-len 8448 --out "$OUT/M4-latency-$gpu.json" > /dev/null
    bench latency --model random:qwen3-0.6b --milestone M3 --input-len 512 2048 8192 --output-len 32 \
      --max-model-len 8448 --no-hf --out "$OUT/M4-latency-m3-$gpu.json" > /dev/null
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --kv-cache-memory 4294967296 \
      --subset 64 --milestone M4 M3 M4 --out "$OUT/M4-$gpu.json" > /dev/null ;;  # first run pays Triton JIT
  m2m3)
    # #12: static batching re-measured (it now fills to max_num_seqs) and paging vs kernel attributed; 3 repeats
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --kv-cache-memory 4294967296 \
      --subset 32 --repeat 3 --milestone M2 M2/static M3/naive M3 --out "$OUT/M2M3-repeats-$gpu.json" > /dev/null
    bench step --model random:qwen3-0.6b --milestone M3 M4/sync M4 --batch-size 1 64 256 \
      --out "$OUT/M4-step-$gpu.json" > /dev/null ;;
  m2m3curves)
    # #12: M2 under load (one engine; Poisson 2..32 req/s, then all at once: throughput vs TTFT/TPOT percentiles)
    # and M3's KV block size on the GPU (decode steps of 256 requests after 1k-token prompts, block sizes 8..128:
    # step wall time and the paged kernel's GPU time). Estimated 2-3 min on an H200 (not yet run).
    bench serve --model random:qwen3-0.6b --max-model-len 2048 --milestone M2 --num-prompts 32 --output-len 32:128 \
      --request-rate 2 4 8 16 32 inf --out "$OUT/M2-curve-$gpu.json" > /dev/null
    bench step --model random:qwen3-0.6b --milestone M3/block=8 M3/block=16 M3/block=32 M3/block=64 M3/block=128 \
      --batch-size 256 --prompt-len 1024 --no-timeline --out "$OUT/M3-blocksize-$gpu.json" > /dev/null ;;
  fastpath)
    # M4 part 2: fused kernels, CUDA graphs, async scheduling; each piece switched off in turn (M4/sync)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_fused_ops.py \
      tests/test_interpreter.py "tests/test_llm.py::test_async_scheduling_changes_no_output" 2>&1 | tail -3
    bench step --model random:qwen3-0.6b --milestone M3 M4/sync M4 --batch-size 1 64 256 \
      --out "$OUT/M4-step-$gpu.json" > /dev/null
    bench latency --model random:qwen3-0.6b --milestone M4 --input-len 128 2048 --output-len 128 \
      --out "$OUT/M4-fastpath-latency-$gpu.json" > /dev/null
    bench latency --model random:qwen3-0.6b --milestone M4/sync --input-len 128 2048 --output-len 128 --no-hf \
      --out "$OUT/M4-fastpath-latency-sync-$gpu.json" > /dev/null
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 3 --milestone M4 M4/sync M3 \
      --out "$OUT/M4-fastpath-W-$gpu.json" ;;
  m6)
    # Prefix caching: TTFT hit vs miss (4k prefix + 128, one hit profiled), 128 requests sharing a 2k system
    # prompt, 16 six-turn chats; M4 (no cache) then M6 on the same prompts, one engine each (~3 min)
    bench prefix --model random:qwen3-8b --milestone M4 M6 --num-prompts 128 \
      --out "$OUT/M6-prefix-$gpu.json" > "$OUT/prefix.log" 2>&1 ;;
  gptqsweep)
    # M7: every decode launch plan of the W4A16 kernel at M = 1, 4, 16 on Qwen3-8B's shapes (the default
    # plans in gptq_gemm.py come from this), kernels only
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "kernel" 2>&1 | tail -2
    bench gptq --kernels-only --sweep --m 1 4 16 --out "$OUT/M7-sweep-$gpu.json" > "$OUT/sweep.log" 2>&1 ;;
  repeats)
    # Issue #12: M3's attribution (paging vs kernel) from 3 repeats, median and spread, in one run
    bench throughput --model random:qwen3-0.6b --max-model-len 2048 --kv-cache-memory 4294967296 \
      --subset 64 --repeat 3 --milestone M3 M3/naive M2 --out "$OUT/M3-repeat3-$gpu.json" > /dev/null ;;
  kvbudget)
    # KV blocks the GPU memory-profiling pass leaves at the default gpu_memory_utilization (one process each)
    for m in M3 M4; do
      python3 -c "
from folovllm import LLM
e = LLM('random:qwen3-0.6b', milestone='$m', max_model_len=8192).llm_engine
print('$m', e.model_runner.backend_name, e.kv_cache_manager.num_blocks, 'blocks')"
    done ;;
  serve)
    # bench serve on one workload, in-process (AsyncLLM) then over HTTP (folovllm serve in another
    # process): the difference is the server's cost per request and per token. The box is offline:
    # FastAPI, uvicorn, prometheus-client and httpx2 come from the wheelhouse (`make wheelhouse`
    # on the CPU side, then run this stage with carry [".whl"]).
    python3 -m pip install -q --no-index --find-links .whl fastapi uvicorn prometheus-client httpx2 \
      || { echo "serve: no wheelhouse: run make wheelhouse and carry .whl"; exit 1; }
    model="--model random:qwen3-0.6b --max-model-len 2048 --kv-cache-memory 4294967296"
    load="--num-prompts 256 --subset 64 --request-rate 8 --seed 0"
    # M4 twice: the first run pays Triton's JIT; the comparison uses the baseline's last row.
    bench serve $model --milestone M4 M4 $load --out "$OUT/serving-inprocess-$gpu.json" > /dev/null
    python3 -m folovllm serve $model --milestone M4 --port 8000 --log-level warning & server=$!
    python3 -c "
import time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen('http://127.0.0.1:8000/health'); break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit('serve: the server did not come up in 300 s')" || { kill $server; exit 1; }
    bench serve $load --base-url http://127.0.0.1:8000 > /dev/null  # warm-up pass: the server's own JIT
    bench serve $load --base-url http://127.0.0.1:8000 --baseline "$OUT/serving-inprocess-$gpu.json" \
      --out "$OUT/serving-$gpu.json" > /dev/null
    kill -TERM $server; wait $server; echo "server exit $? (0: SIGTERM drained)" ;;
  fullgraphs)
    # Full CUDA graphs for mixed steps (cudagraph_mode="FULL", M5 on): GPU tests (graph tokens == eager tokens
    # for decode and mixed steps; the kernel's binary-search grid), then M6's TTFT hit vs miss and the
    # six-turn chats with M4, M6 with M4's decode-only graphs, and M6 (qwen3-8b, one process).
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_triton_attention.py 2>&1 | tail -25
    timeout 300 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M4 M6/decode-graphs M6 \
      --parts ttft chat --out "$OUT/M6-fullgraphs-$gpu.json" > "$OUT/prefix.log" 2>&1; echo "prefix: exit $?" ;;
  m5full)
    # The mixed workload of stage m5 with the engine's step records: M4, M5 with decode-only graphs, M5
    # (full graphs), budget 512 and dynamic sizing at 10 / 20 ms, one process (the first row pays the JIT).
    timeout 420 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --collect-step-stats \
      --milestone M5/budget=512@12 M4 M5/decode-graphs M5 M5/budget=512 M5/budget=8192/itl=10 \
      M5/budget=8192/itl=20 --out "$OUT/M5-fullgraphs-$gpu.json" > "$OUT/serve.log" 2>&1; echo "serve: exit $?" ;;
  m5fair)
    # M5 vs M4 with each warmed up on its own shapes first (M4's eager FA2 prefills compile their kernels in the
    # warm-up row, not in the measured one): budgets 2048 (the preset), 512, 256, dynamic 10 / 20 ms; step records.
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py -k mixed 2>&1 | tail -3
    timeout 400 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --collect-step-stats \
      --milestone M5/budget=512@12 M4@12 M4 M5 M5/budget=512 M5/budget=256 M5/budget=8192/itl=10 \
      M5/budget=8192/itl=20 --out "$OUT/M5-fair-$gpu.json" > "$OUT/serve.log" 2>&1; echo "serve: exit $?" ;;
  fullgraphs2)
    # #13 on random:qwen3-8b (the mixed workload at 8 req/s, warmed rows first), then W on qwen3-0.6b with
    # M4, M5 and M6 (full graphs must not cost W), then M6's shared 2k system prompt with M4 vs M6 on qwen3-8b.
    timeout 300 python3 -m folovllm bench serve --model random:qwen3-8b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 8 --seed 0 --collect-step-stats \
      --milestone M5/budget=512@12 M4@12 M4 M5 M5/budget=512 --out "$OUT/M5-serve-mixed-qwen3-8b-$gpu.json" \
      > "$OUT/serve.log" 2>&1; echo "serve: exit $?"
    timeout 120 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 \
      --milestone M4 M4 M5 M6 --out "$OUT/M5-W-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    timeout 150 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M4 M6 --parts throughput \
      --num-prompts 128 --out "$OUT/M6-shared-fullgraphs-$gpu.json" > "$OUT/prefix.log" 2>&1; echo "prefix: exit $?" ;;
  m5preset)
    # The M5 preset's budget is 512 (from stages m5fair and fullgraphs2): M4 vs M5 on the mixed workload (warmed
    # rows first), W with M4, M5 and M6, and every part of M6's prefix benchmark with M4 vs M6 (qwen3-8b).
    timeout 200 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --collect-step-stats \
      --milestone M5@12 M4@12 M4 M5 --out "$OUT/M5-preset-$gpu.json" > "$OUT/serve.log" 2>&1; echo "serve: exit $?"
    timeout 120 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 \
      --milestone M4 M4 M5 M6 --out "$OUT/M5-W-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    timeout 240 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M4 M6 --num-prompts 128 \
      --out "$OUT/M6-prefix-$gpu.json" > "$OUT/prefix.log" 2>&1; echo "prefix: exit $?" ;;
  chunks)
    # #13: one layer's attention on chunked-prefill shapes, the paged kernel (beside 0 or 64 decode rows) against
    # FA2 on the same chunk with its context pre-gathered; qwen3-0.6b's and qwen3-8b's head geometry. Then the
    # M5 chapter exported as a script (DIR as for stage chapters).
    g="--prompt-len 256 512 2048 --context-len 0 2048 8192 --num-decodes 0 64"
    timeout 200 python3 -m folovllm bench prefill $g --out "$OUT/M5-chunk-attention-$gpu.json" > /dev/null
    timeout 200 python3 -m folovllm bench prefill $g --num-heads 32 --out "$OUT/M5-chunk-attention-qwen3-8b-$gpu.json" \
      > /dev/null; echo "chunks: exit $?" ;;
  chunksplits)
    # #13, eleventh session: split-K for chunks. The paged kernel on chunk shapes with 1 to 16 context slices
    # forced, beside the count the planner picks, for qwen3-0.6b's and qwen3-8b's head geometry (decodes at the
    # chunk's context, as in stage chunks); what sets `_CHUNK_WAVES` in `attention/ops/paged_attn.py`.
    g="--prompt-len 256 512 2048 --context-len 0 2048 8192 --num-decodes 0 32 --num-splits 1 2 4 8 16"
    timeout 260 python3 -m folovllm bench prefill $g --out "$OUT/M5-chunk-splits-$gpu.json" > /dev/null
    echo "0.6b: exit $?"
    timeout 200 python3 -m folovllm bench prefill $g --num-heads 32 --out "$OUT/M5-chunk-splits-qwen3-8b-$gpu.json" \
      > /dev/null; echo "8b: exit $?" ;;
  m5splits)
    # #13, eleventh session, after chunksplits set `_CHUNK_WAVES` (2 programs per SM): the GPU tests of the paged
    # kernel and the mixed CUDA graphs, then M4 vs M5 at 16 req/s on qwen3-0.6b, seeds 0, 1, 2 (as in
    # ninthheadlines; M5@12 and M4@12 are warm-up rows).
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_cuda_graph.py \
      2>&1 | tail -2
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 0 1 2; do
      timeout 150 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 100 --request-rate 16 \
        --seed $seed --milestone M5@12 M4@12 M4 M5 --out "$OUT/M5-splits-16-seed$seed-$gpu.json" > /dev/null 2>&1
      echo "seed $seed: exit $?"
    done ;;
  m5splitsload)
    # #13, after m5splits (whose M4 rows came out 1.3-1.6x faster than the same seeds' in ninthheadlines, so the
    # 100-request p99 is noisy): M4 vs M5 at 16 req/s with 200 requests (seeds 0, 1, 2), then the saturated
    # 32 req/s run of m5calibrated (seed 0) with split-K in the chunks.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 0 1 2; do
      timeout 140 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 200 --request-rate 16 \
        --seed $seed --milestone M5@12 M4@12 M4 M5 --out "$OUT/M5-splits-16x200-seed$seed-$gpu.json" > /dev/null 2>&1
      echo "16 req/s seed $seed: exit $?"
    done
    timeout 150 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
      --seed 0 --milestone M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=15 \
      --out "$OUT/M5-splits-32-seed0-$gpu.json" > /dev/null 2>&1; echo "32 req/s: exit $?" ;;
  m5splitsseeds)
    # #13, after m5splitsload (4.66x, 3.93x, 5.64x with 200 requests): seeds 3 and 4 the same way, workload W
    # offline (M4 twice, the first pays the JIT, then M5: short fresh prompts are where split chunks cost), then
    # the M5 chapter exported as a script (DIR as for stage chapters).
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 3 4; do
      timeout 140 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 200 --request-rate 16 \
        --seed $seed --milestone M5@12 M4@12 M4 M5 --out "$OUT/M5-splits-16x200-seed$seed-$gpu.json" > /dev/null 2>&1
      echo "16 req/s seed $seed: exit $?"
    done
    timeout 130 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 \
      --milestone M4 M4 M5 --out "$OUT/M5-W-splits-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    CHAPTER_TIMEOUT=200 bash "$0" chapters "${2:?usage: run_gpu.sh m5splitsseeds DIR}" ;;
  m5tailfrom|m5tailfromseeds|m5tailfrom8b)
    # #13, prepared in the eleventh session, run in the twelfth: the dynamic mode after its tail is learned only
    # from prompt steps priced at half the target or more (StepCostModel.tail_from; small steps are host-paced).
    # m5tailfrom: first the slice floor applied per sequence on the device: fresh and deep chunks, the planned
    # launch (`triton`) beside forced counts, and W offline; then qwen3-0.6b at 32 req/s, seed 0, beside the fixed
    # budgets, the dynamic mode at 15 ms and at 11 ms (between budget 256's and 512's p99 ITL in the eleventh
    # session's run). m5tailfromseeds: the same serve rows, seeds 1 and 2. m5tailfrom8b: qwen3-8b at 12 req/s
    # (seed 0; targets 20 and 23 ms, between budget 256's and 512's p99 ITL in earlier runs).
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    m="M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=15 M5/budget=8192/itl=11"
    seeds="0"
    if [ "$1" = m5tailfrom ]; then
      timeout 120 python3 -m folovllm bench prefill --prompt-len 256 512 --context-len 0 8192 --num-decodes 0 32 \
        --num-splits 1 2 4 --out "$OUT/M5-chunk-floor-$gpu.json" > /dev/null; echo "floor: exit $?"
      timeout 130 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 \
        --milestone M4 M4 M5 --out "$OUT/M5-W-floor-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    fi
    [ "$1" = m5tailfromseeds ] && seeds="1 2"
    if [ "$1" != m5tailfrom8b ]; then
      for seed in $seeds; do
        timeout 200 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
          --seed $seed --milestone $m --out "$OUT/M5-tailfrom-32-seed$seed-$gpu.json" > /dev/null 2>&1
        echo "0.6b seed $seed: exit $?"
      done
    else
      timeout 400 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
        --seed 0 --milestone M5@12 M5/budget=256 M5 M5/budget=8192/itl=20 M5/budget=8192/itl=23 \
        --out "$OUT/M5-tailfrom-12-qwen3-8b-seed0-$gpu.json" > /dev/null 2>&1; echo "8b: exit $?"
    fi ;;
  m5quantile|m5quantile8b)
    # #13, twelfth session: m5tailfrom showed the tail factor learned as a ratio ratchets (3.0-3.7 after host
    # stalls, kept for the rest of the run). Now the factor is steered by feedback on the target (an online
    # 98th-percentile estimate of the prompt steps' time). m5quantile: qwen3-0.6b at 32 req/s, seeds 0-2, budgets
    # 256/512/2048 beside the dynamic mode at 10 ms (between 256's and 512's p99 ITL in m5tailfrom) and 15 ms.
    # m5quantile8b: qwen3-8b at 12 req/s, seed 0, budgets 128/256/512 beside the dynamic mode at 15 and 20 ms.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    if [ "$1" = m5quantile ]; then
      for seed in 0 1 2; do
        timeout 180 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
          --seed $seed --milestone M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=10 M5/budget=8192/itl=15 \
          --out "$OUT/M5-quantile-32-seed$seed-$gpu.json" > /dev/null 2>&1; echo "0.6b seed $seed: exit $?"
      done
    else
      timeout 400 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
        --seed 0 --milestone M5@12 M5/budget=128 M5/budget=256 M5 M5/budget=8192/itl=15 M5/budget=8192/itl=20 \
        --out "$OUT/M5-quantile-12-qwen3-8b-seed0-$gpu.json" > /dev/null 2>&1; echo "8b: exit $?"
    fi ;;
  m5p99)
    # #13, twelfth session, after m5quantile: the factor steered to the p99 of every step (decode-only steps
    # under the target count, those over it do not) instead of the p98 of prompt steps, which ran over the
    # target where most steps carried prompts. qwen3-0.6b at 32 req/s (seeds 0 and 1), qwen3-8b at 12 req/s.
    # Run again from d959e87 on, its dynamic rows also record every steered step (cost_model.steered_steps): the
    # next step for #13, whether the dynamic points sit under the fixed budgets' frontier by mispricing or by room left.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 0 1; do
      timeout 150 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
        --seed $seed --milestone M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=10 M5/budget=8192/itl=15 \
        --out "$OUT/M5-p99-32-seed$seed-$gpu.json" > /dev/null 2>&1; echo "0.6b seed $seed: exit $?"
    done
    timeout 200 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
      --seed 0 --milestone M5@12 M5/budget=128 M5/budget=256 M5 M5/budget=8192/itl=15 M5/budget=8192/itl=20 \
      --out "$OUT/M5-p99-12-qwen3-8b-seed0-$gpu.json" > /dev/null 2>&1; echo "8b: exit $?" ;;
  m5padded)
    # #13, prepared in the twelfth session (run in the thirteenth at abcbf66): the dynamic mode filling the captured size a step pads to
    # (Scheduler._padded), beside the fixed budgets, with its ceiling at 8,192 tokens (steps past the ladder's 2,048
    # run eagerly) and at 2,048; qwen3-0.6b at 32 req/s (seeds 0 and 1), then qwen3-8b at 12 req/s. ~6 min.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    d="M5/budget=8192/itl=10 M5/budget=8192/itl=15 M5/budget=2048/itl=10 M5/budget=2048/itl=15"
    for seed in 0 1; do
      timeout 170 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
        --seed $seed --milestone M5@12 M5/budget=256 M5 M5/budget=2048 $d \
        --out "$OUT/M5-padded-32-seed$seed-$gpu.json" > /dev/null 2>&1; echo "0.6b seed $seed: exit $?"
    done
    timeout 240 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
      --seed 0 --milestone M5@12 M5/budget=128 M5/budget=256 M5 M5/budget=8192/itl=15 M5/budget=2048/itl=15 \
      M5/budget=2048/itl=20 --out "$OUT/M5-padded-12-qwen3-8b-seed0-$gpu.json" > /dev/null 2>&1; echo "8b: exit $?" ;;
  m5eightb)
    # #13, fourteenth session: m5padded showed the dynamic mode at 15 ms on qwen3-8b holding the target where budget
    # 256 missed it and 128 gave up 6-7% of the throughput (one seed). Two more seeds, with budget 192 (a captured
    # size between them) to test whether a finer fixed grid closes the gap. 261 s on the H200.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 1 2; do
      timeout 280 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
        --seed $seed --milestone M5@12 M5/budget=128 M5/budget=192 M5/budget=256 M5/budget=8192/itl=15 \
        M5/budget=2048/itl=15 --out "$OUT/M5-padded-12-qwen3-8b-seed$seed-$gpu.json" > /dev/null 2>&1
      echo "8b seed $seed: exit $?"
    done ;;
  hfcb)
    # #11: workload W (64-prompt subset, as the issue allows for HF) with M4 and HF transformers' own continuous
    # batching (ContinuousBatchingManager: same weights, same requests, each its own output length, EOS off);
    # M4 runs twice (the first pays the JIT), M3 for scale.
    timeout 400 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --subset 64 \
      --milestone M4 M4 M3 HF --out "$OUT/M4-hf-cb-$gpu.json" > "$OUT/hfcb.log" 2>&1; echo "hfcb: exit $?"
    python3 -c "import transformers; print('transformers', transformers.__version__)" ;;
  m5sweep)
    # #13's sweep with full graphs, all budgets 256..8192 beside M4 and dynamic 10/20 ms, one process on
    # qwen3-0.6b at 16 req/s, warm-up rows first (~4 min); m5sweep8b: the same on qwen3-8b at 8 req/s (~5 min).
    s="--workload mixed --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --seed 0 --collect-step-stats"
    b="M4 M5/budget=256 M5 M5/budget=1024 M5/budget=2048 M5/budget=4096 M5/budget=8192 M5/budget=8192/itl=10 M5/budget=8192/itl=20"
    timeout 290 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 $s --request-rate 16 \
      --milestone M5@12 M4@12 $b --out "$OUT/M5-sweep-$gpu.json" > "$OUT/sweep.log" 2>&1; echo "0.6b: exit $?" ;;
  m5sweep8b)
    s="--workload mixed --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --seed 0 --collect-step-stats"
    b="M4 M5/budget=256 M5 M5/budget=1024 M5/budget=2048 M5/budget=4096 M5/budget=8192 M5/budget=8192/itl=10 M5/budget=8192/itl=20"
    timeout 300 python3 -m folovllm bench serve --model random:qwen3-8b --max-model-len 9216 $s --request-rate 8 \
      --milestone M5@12 M4@12 $b --out "$OUT/M5-sweep-qwen3-8b-$gpu.json" > "$OUT/sweep8b.log" 2>&1; echo "8b: exit $?" ;;
  m6spec)
    # #14 as specified: 256 requests sharing a 2k-token system prompt, M5 vs M6 (prefix caching alone).
    timeout 200 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M5 M6 --parts throughput \
      --num-prompts 256 --out "$OUT/M6-shared-256-$gpu.json" > "$OUT/prefix.log" 2>&1; echo "prefix: exit $?" ;;
  compilestep)
    # #11: torch.compile (Inductor, split at attention; M4/compile) against M4's hand-fused Triton kernels, both
    # under CUDA graphs: GPU tests, then one decode step kernel by kernel (top kernels by name) at batch 1/64/256.
    python3 -m pytest -q -p no:cacheprovider tests/test_compile.py 2>&1 | tail -2
    timeout 200 python3 -m folovllm bench step --model random:qwen3-0.6b --milestone M4 M4/compile \
      --batch-size 1 64 256 --out "$OUT/M4-compile-step-$gpu.json" > "$OUT/step.log" 2>&1; echo "step: exit $?" ;;
  compile)
    # #11, continued: batch-1 TPOT of M4/compile, then W with 3 repeats, M4 beside M4/compile.
    m="--model random:qwen3-0.6b"
    timeout 150 python3 -m folovllm bench latency $m --milestone M4/compile --input-len 128 2048 --output-len 128 --no-hf \
      --out "$OUT/M4-compile-latency-$gpu.json" > /dev/null 2>&1; echo "latency: exit $?"
    timeout 240 python3 -m folovllm bench throughput $m --max-model-len 2048 --repeat 3 --milestone M4 M4/compile \
      --out "$OUT/M4-compile-W-$gpu.json" > /dev/null 2>&1; echo "W: exit $?" ;;
  gptqW)
    # #15: W (64-prompt subset) with bf16 and GPTQ weights under the same preset (M7: M6 + quantization
    # when asked), each twice in one process so neither measured row pays a compile (the first run of stage gptq
    # compared M4 bf16 with M7 GPTQ, and its GPTQ row may have paid Triton's JIT).
    timeout 400 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7 M7/gptq M7/gptq \
      --out "$OUT/M7-throughput-$gpu.json" > /dev/null 2>&1; echo "W: exit $?" ;;
  skinny)
    # Ran at commit 75aefe3, whose M4 multiplied decode batches of <= 4 rows by weights <= 16 MiB with a Triton
    # "skinny GEMM" instead of cuBLAS (`bench gemm` timed both per projection). It lost to cuBLAS on every shape
    # but one and was removed after this run, so `bench gemm` exists at that commit only. The rest: one decode step
    # kernel by kernel (M3 vs M4), batch-1 TPOT (qwen3-0.6b, llama-3.2-1b, HF alongside), W (M4 vs M3, 2
    # repeats), and the mixed workload with the paged kernel's start-up warm-up (triton_compiles per row).
    python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py tests/test_jit_watch.py \
      tests/test_triton_attention.py tests/test_cuda_graph.py -k "skinny or jit or warm_up or gpu" 2>&1 | tail -3
    for m in qwen3-0.6b llama-3.2-1b; do
      timeout 60 python3 -m folovllm bench gemm --model random:$m --m 1 2 4 --out "$OUT/M4-gemm-$m-$gpu.json" > /dev/null
    done; echo "gemm: exit $?"
    timeout 90 python3 -m folovllm bench step --model random:qwen3-0.6b --milestone M3 M4 --batch-size 1 64 256 \
      --out "$OUT/M4-step-$gpu.json" > /dev/null 2>&1; echo "step: exit $?"
    for m in qwen3-0.6b llama-3.2-1b; do
      timeout 90 python3 -m folovllm bench latency --model random:$m --milestone M4 --input-len 128 2048 --output-len 128 \
        --out "$OUT/M4-skinny-latency-$m-$gpu.json" > /dev/null 2>&1; echo "latency $m: exit $?"
    done
    timeout 130 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 2 \
      --milestone M4 M3 --out "$OUT/M4-skinny-W-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    timeout 110 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --collect-step-stats \
      --milestone M5@12 M4@12 M4 M5 M5/budget=4096 --out "$OUT/M5-warmed-$gpu.json" > "$OUT/serve.log" 2>&1
    echo "serve: exit $?" ;;
  jitvariants)
    # Not yet run. Which paged-kernel variants the start-up warm-up still misses: the rows of stage skinny that
    # compiled mid-run, now with each compilation's signature (triton_compiled_variants), then the GPU tests
    # touched last (graph memory measured after emptying the allocator's cache; the JIT hook on real kernels).
    python3 -m pytest -q -p no:cacheprovider tests/test_jit_watch.py tests/test_cuda_graph.py -k gpu 2>&1 | tail -3
    timeout 110 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 \
      --milestone M5@12 M4@12 M4 M5 M5/budget=4096 --out "$OUT/M5-jit-variants-$gpu.json" > /dev/null 2>&1
    timeout 100 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 2 \
      --milestone M4 --out "$OUT/M4-jit-variants-W-$gpu.json" > /dev/null 2>&1; echo "jit: exit $?" ;;
  gptqfloat)
    # M7, the codes turned into floats by a shift and one AND-OR (1 + q/2^bits, commit in the JSON): kernel tests
    # on the GPU, then the decode-plan sweep, kernels vs cuBLAS, memory and batch-1 TPOT (as stage gptq).
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py tests/test_jit_watch.py -k "kernel or gpu" 2>&1 | tail -2
    timeout 400 python3 -m folovllm bench gptq --sweep --out "$OUT/M7-float-codes-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  gptqwords)
    # M7: the kernels at M = 1 and 16 with the plans tuned by stage gptqfloat's successor (commit f85870f), and at
    # M = 1 the GEMV's load-only twin (words_only_*): is the launch shape or the arithmetic the limit?
    timeout 200 python3 -m folovllm bench gptq --kernels-only --m 1 16 --out "$OUT/M7-words-only-$gpu.json" \
      > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?" ;;
  gptqrow)
    # M7: the GEMV with its accumulator in the words' layout (one row of X per program): the decode-plan sweep,
    # kernels at M = 1..64 (with the load-only twin at M = 1), memory and batch-1 TPOT.
    timeout 330 python3 -m folovllm bench gptq --sweep --m 1 4 16 64 --out "$OUT/M7-gemv-layout-$gpu.json" \
      > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"; cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  fifthfixes)
    # Run at 640d064 (sixth session; its m5dynamic2 files were saved as M5-dynamic-interval-*.json, the
    # kept-fit names holding the 0a8f201 run): what the fifth session changed after its device time was spent. The GPU tests of those files;
    # M4's W and the serve rows (does M4 still compile the paged kernel mid-run once gathered block tables keep the
    # engine table's stride?); dynamic sizing learning the step interval with stalls left out (stage m5dynamic2
    # again). About 7 device-minutes; then stage gemvm4.
    python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py tests/test_scheduler.py \
      tests/test_jit_watch.py 2>&1 | tail -2
    timeout 100 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 2 \
      --milestone M4 --out "$OUT/M4-W-stride-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    bash "$0" m5dynamic2 ;;
  gemvm4)
    # Run at 640d064: the W4A16 decode sweep with one-row GEMV plans at M = 4 (about 3 device-minutes).
    timeout 200 python3 -m folovllm bench gptq --kernels-only --sweep --m 1 4 16 --out "$OUT/M7-gemv-m4-$gpu.json" \
      > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"; cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  gptqprobe)
    # Run at 606708c. The sixth session's W4A16 kernels, a first timing before the full sweep: swapped operands at M = 16,
    # whole-block prefill at M = 256, narrow one-row plans at M = 1, act-order with X permuted once; then the
    # bf16 GPU tests of those plans. About 3 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "bf16_plans or permutes" 2>&1 | tail -2
    timeout 300 python3 milestones/results/gptq_probe.py "$OUT/M7-probe6-$gpu.json" > "$OUT/probe.log" 2>&1
    echo "probe: exit $?" ;;
  sixth)
    # What the sixth session ran after m5tail, gptqprobe and skinny2 (each call one line here, commit in brackets):
    # [5595a63, GPTQ prefill default = whole blocks] W's fair pair and the kernel table + TPOT bf16 vs GPTQ;
    # [e7dd284, the tuned skinny table in the tree] batch-1 latency under M4; [4e7a920, skinny at one row only]
    # the GPU tests of graphs and the skinny GEMM.
    timeout 420 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7 M7/gptq M7/gptq --out "$OUT/M7-throughput6-$gpu.json"
    timeout 330 python3 -m folovllm bench gptq --m 1 16 256 4096 --out "$OUT/M7-tpot6-$gpu.json"
    timeout 300 python3 -m folovllm bench latency --model random:qwen3-0.6b --milestone M4 --input-len 128 2048 \
      --output-len 128 --out "$OUT/M4-skinny-latency2-$gpu.json"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_skinny_gemm.py 2>&1 | tail -3 ;;
  merge)
    # #11 after the prologue fusion: split-K attention merged by its last split inside the attention launch (no
    # second kernel: at batch 1 with max_model_len >= 1024 that was 28 launches a step). Batch-1 latency with HF
    # (qwen3-0.6b, 128 and 2,048), Llama-3.2-1B at 128, then the GPU tests of split attention and graphs.
    timeout 150 python3 -m folovllm bench latency --model random:qwen3-0.6b --milestone M4 --input-len 128 2048 \
      --output-len 128 --out "$OUT/M4-merge-latency-$gpu.json" > /dev/null 2>&1; echo "0.6b: exit $?"
    timeout 60 python3 -m folovllm bench latency --model random:llama-3.2-1b --milestone M4 --input-len 128 \
      --output-len 128 --no-hf --out "$OUT/M4-merge-latency-llama-3.2-1b-$gpu.json" > /dev/null 2>&1; echo "1b: exit $?"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_cuda_graph.py 2>&1 | tail -3 ;;
  m5phased)
    # #13's last claim, on a load that changes mid-run (--workload phased): 120 requests at 8 req/s on qwen3-8b,
    # the first half W's short prompts, the second half with 30% long prompts (4k-8k) whose decodes then read
    # long contexts. Fixed budgets 256 / 512 / 2,048 beside the dynamic mode at a 30 ms target; each half's
    # latency percentiles apart (row["phases"]). About 6 device-minutes.
    s="--workload phased --num-prompts 120 --output-len 100:512 --long-fraction 0.3 --seed 0 --collect-step-stats"
    timeout 450 python3 -m folovllm bench serve --model random:qwen3-8b --max-model-len 9216 $s --request-rate 8 \
      --milestone M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=30 \
      --out "$OUT/M5-phased-qwen3-8b-$gpu.json" > "$OUT/phased.log" 2>&1; echo "phased: exit $?" ;;
  prologue)
    # #11's batch-1 TPOT: the decoder norms and SiLU·mul fused into the prologue of the skinny GEMM after them
    # (three launches fewer per layer at one row). GPU tests (graph replays give eager tokens, fused = separate,
    # the 2-bit GPTQ shared-memory fix); TPOT in three arms in one process (cuBLAS / tuned with separate
    # norms / fused); bench latency with HF at 128 and 2,048; one decode step's profile. About 7 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_skinny_gemm.py tests/test_cuda_graph.py tests/test_fused_ops.py 2>&1 | tail -3
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "kernel_matches and 2-16 or shared_memory" 2>&1 | tail -2
    timeout 200 python3 -m folovllm bench gemm --model random:qwen3-0.6b --m 1 --tpot \
      --out "$OUT/M4-prologue-qwen3-0.6b-$gpu.json" > "$OUT/gemm.log" 2>&1; echo "gemm: exit $?"
    timeout 240 python3 -m folovllm bench latency --model random:qwen3-0.6b --milestone M4 --input-len 128 2048 \
      --output-len 128 --out "$OUT/M4-prologue-latency-$gpu.json" > /dev/null 2>&1; echo "latency: exit $?"
    timeout 100 python3 -m folovllm bench step --model random:qwen3-0.6b --milestone M4 --batch-size 1 \
      --out "$OUT/M4-step-b1-prologue-$gpu.json" > /dev/null 2>&1; echo "step: exit $?" ;;
  nosync)
    # #11 after removing the host's waits from the async step: the in-flight token copy, the sampler's
    # parameters, FA2's row split and the block table were copied from pageable memory, and PyTorch
    # then drains the stream, so step n+1 was built only after step n had finished; and the K/V store
    # fused into the RoPE kernel (28 launches a step fewer). Run at the commit that also fixes the race
    # this exposed (the logits indices were copied after the event the next step waits on; the first run,
    # at 7c08599, failed the mixed-graph test) and calls FA2's ATen op without varlen_attn's Python
    # wrapper. GPU tests (no sync inside async steps, fused store = backend store, graphs = eager), batch-1
    # latency with HF repeated 5x (medians), one decode step's profile, the 2,048-token prefill step
    # profiled under M3 and M4. About 5 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py tests/test_cuda_graph.py tests/test_flash_attention.py 2>&1 | tail -4
    timeout 200 python3 -m folovllm bench latency --model random:qwen3-0.6b --milestone M4 --input-len 128 2048 \
      --output-len 128 --repeats 5 --out "$OUT/M4-nosync-latency-$gpu.json" > /dev/null 2>&1; echo "latency: exit $?"
    timeout 100 python3 -m folovllm bench step --model random:qwen3-0.6b --milestone M4 --batch-size 1 \
      --out "$OUT/M4-step-b1-nosync-$gpu.json" > /dev/null 2>&1; echo "step: exit $?"
    timeout 100 python3 -m folovllm bench step --model random:qwen3-0.6b --milestone M3 M4 --batch-size 1 \
      --prompt-len 2048 --steps 5 --prefill --no-timeline --out "$OUT/M4-prefill-step-$gpu.json" > /dev/null 2>&1
    echo "prefill: exit $?" ;;
  nosyncw)
    # The same commit: W with three repeats in one process under M4 (#11's 21,000 tok/s), M4 without async
    # scheduling and M3, beside HF transformers' continuous batching on W's first 32 requests (one run);
    # Llama-3.2-1B's batch-1 latency (5 repeats). About 6 device-minutes.
    timeout 450 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 3 \
      --milestone M4 M4/sync M3 HF@32 --out "$OUT/M4-nosync-W-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    timeout 100 python3 -m folovllm bench latency --model random:llama-3.2-1b --milestone M4 --input-len 128 \
      --output-len 128 --repeats 5 --no-hf --out "$OUT/M4-nosync-latency-llama-3.2-1b-$gpu.json" > /dev/null 2>&1
    echo "1b: exit $?" ;;
  m5saturated)
    # #13, run in the ninth session at 03129fe: dynamic sizing where a fixed budget must give
    # something up. At 16 req/s the preset's 512 kept up and held p99 ITL (M5-preset), so any target it met
    # cost it nothing. Here the mixed workload arrives at 24 and 32 req/s (qwen3-0.6b, after the host-wait
    # fix): a small fixed budget admits prompts too slowly (throughput and TTFT suffer), a large one lets
    # prompt steps stretch the ITL tail; the dynamic mode at 15 ms should hold that tail with throughput
    # at least the small budget's. About 7 device-minutes.
    s="--workload mixed --num-prompts 160 --output-len 100:512 --long-fraction 0.15 --seed 0 --collect-step-stats"
    for rate in 24 32; do
      timeout 240 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 $s --request-rate $rate \
        --milestone M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=15 \
        --out "$OUT/M5-saturated-$rate-$gpu.json" > "$OUT/saturated-$rate.log" 2>&1; echo "rate $rate: exit $?"
    done ;;
  gemvprefetch)
    # #15, run in the ninth session at 03129fe (depths 2 and 3 were slower on every shape, so the knob was
    # removed afterwards; the table in the tree kept its 8c893f1 plans): the one-row FMA kernel (and its load-only twin)
    # loading 2 or 3 word tiles ahead instead of 1. Each warp issues its next load only after the previous
    # tile's use, so one tile ahead keeps little in flight (the twin read 2.2-2.9 TB/s of the copy's 4.19).
    # GPU tests, then the sweep at M = 1 only (its plans replace the table's M = 1 entries, the rest kept),
    # the kernel table at M = 1, 4, 16 with the twin, weight memory and batch-1 TPOT. About 6 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "gemv or word_stream or kernel_matches" 2>&1 | tail -2
    timeout 480 python3 -m folovllm bench gptq --sweep-m 1 --m 1 4 16 --out "$OUT/M7-prefetch-sweep-$gpu.json" \
      > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  gptqpairs)
    # #15, fifteenth session: the decode tl.dot kernel with codes made bf16 two per word op and the zero point
    # subtracted in bf16 (GemmPlan.pairs, _gptq_gemm_pairs_kernel: ~5 PTX instructions per weight in its K loop
    # against ~9 for swap_ab, compiled on the CPU). GPU tests, then the sweep at M = 1 and 16 with the pairs plans
    # beside the others (their winners replace the table's M = 1 and 16 entries), the kernel table at M = 1, 4, 16.
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "pairs or bf16_plans" 2>&1 | tail -2
    timeout 480 python3 -m folovllm bench gptq --kernels-only --sweep-m 1 16 --m 1 4 16 \
      --out "$OUT/M7-pairs-sweep-$gpu.json" > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  gptqpairs2)
    # #15, fifteenth session, after gptqpairs (at 51e9fdb; its table committed): the sweep at M = 4 (pairs plans
    # there too; the table keeps its other entries), then the kernel table at every M with the new table, weight
    # memory and batch-1 TPOT bf16 vs GPTQ, then W's fair pair (64-prompt subset). About 8 device-minutes.
    timeout 300 python3 -m folovllm bench gptq --sweep-m 4 --m 1 4 16 64 256 4096 --out "$OUT/M7-pairs-$gpu.json" \
      > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"; cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    w="--model random:qwen3-8b --max-model-len 2048 --kv-cache-memory 17179869184 --subset 64"
    timeout 250 python3 -m folovllm bench throughput $w --milestone M7 M7 M7/gptq M7/gptq \
      --out "$OUT/M7-throughput-pairs-$gpu.json" > /dev/null 2>&1; echo "throughput: exit $?" ;;
  gptqpairs3)
    # #15, fifteenth session, after gptqpairs2: the pairs kernel with one tensor-core product per block (the block's
    # codes joined into one operand, the zero point taken off with one sum of X per block: one wait per block
    # instead of eight, ~3.9 PTX instructions per weight). No sweep (the device budget left allowed none): the
    # kernel table at M = 1, 4, 16 under the plans gptqpairs and gptqpairs2 tuned for the slice version, weight
    # memory and batch-1 TPOT. About 2 device-minutes. Ran at ed200a9: slower against bf16 on every pairs row
    # (M7-pairs-block-h200.json), so the kernel went back to c164d6f's slice pairs.
    timeout 240 python3 -m folovllm bench gptq --m 1 4 16 --out "$OUT/M7-pairs-block-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?" ;;
  gptqpairs64)
    # #15, sixteenth session: up to 64 rows the GEMM still streams weights, but the sweep offered only dequantized
    # tiles there (0.41-0.77x bf16 at M = 64). Now it also times the bf16 code pairs with all rows in one 64-row
    # tile (sweep_plans); the winners replace the table's M = 64 entries. Then the kernel table at M = 16 and 64,
    # and W's fair pair (64-prompt subset) with the new table. About 8 device-minutes.
    timeout 280 python3 -m folovllm bench gptq --kernels-only --sweep-m 64 --m 16 64 \
      --out "$OUT/M7-pairs64-$gpu.json" > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    w="--model random:qwen3-8b --max-model-len 2048 --kv-cache-memory 17179869184 --subset 64"
    timeout 250 python3 -m folovllm bench throughput $w --milestone M7 M7 M7/gptq M7/gptq \
      --out "$OUT/M7-throughput-pairs64-$gpu.json" > /dev/null 2>&1; echo "throughput: exit $?" ;;
  decodelimits)
    # #15, sixteenth session: what limits the decode kernel (milestones/results/m7_decode_limits.py): the pairs
    # kernel against a variant with 18% fewer K-loop instructions (code pairs adjacent along K, no byte shuffles),
    # the same loop with no integer work, the word-streaming twin, and the pairs kernel at 5 and 6 programs per SM
    # (maxnreg 96, 80). About 4 device-minutes.
    timeout 420 python3 milestones/results/m7_decode_limits.py "$OUT/M7-decode-limits-$gpu.json" ;;
  wsdecode)
    # #15, seventeenth session: the warp-specialized Gluon decode kernel (ops/gluon_gptq.py: a TMA loader warp, a
    # compute warpgroup with wgmma on register codes) over tile width, ring depth, sync or async products and K
    # split, against the tuned plans and bf16 cuBLAS at M = 1, 4, 16; edge cases (partial tile, bias, per-channel,
    # 2-bit) checked against the reference. About 3 device-minutes.
    timeout 420 python3 milestones/results/m7_ws_decode.py "$OUT/M7-ws-decode-$gpu.json" ;;
  wstpot)
    # #15, seventeenth session, with the Gluon plans in the tuned table (m7_ws_decode.py --tune): GPU tests of the
    # Gluon kernel and its dispatch, the kernel table at M = 1, 4, 16, weight memory and batch-1 TPOT bf16 vs GPTQ.
    # About 3 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 240 python3 -m folovllm bench gptq --m 1 4 16 --out "$OUT/M7-ws-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?" ;;
  permdecode)
    # #15, eighteenth session: the Gluon kernel's codes made by _byte_perm_asm (prmt + lop3 + sub.bf16x2 per
    # register, 363 SASS instructions per block against 480); GPU tests of both ways, then the sweep with the
    # tuned plan timed both ways side by side (tuned, tuned_shift). About 4 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 420 python3 milestones/results/m7_ws_decode.py "$OUT/M7-perm-decode-$gpu.json" ;;
  permtpot)
    # #15, eighteenth session, after m7_ws_decode.py --tune on permdecode's JSON: the kernel table at M = 1, 4, 16,
    # weight memory and batch-1 TPOT bf16 vs GPTQ; then --variants. About 4 device-minutes.
    timeout 300 python3 -m folovllm bench gptq --m 1 4 16 --out "$OUT/M7-perm-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    # the large projections' tuned plans beside async products, a deeper ring, two warpgroups, other register caps
    timeout 200 python3 milestones/results/m7_ws_decode.py --variants "$OUT/M7-perm-variants-$gpu.json" ;;
  permstep)
    # #15, eighteenth session: where batch-1 decode time goes on random:qwen3-8b, kernel by kernel (torch.profiler),
    # bf16 (M4) beside GPTQ with and without CUDA graphs: the projections' share of a step bounds what any W4A16
    # kernel can do for TPOT. About 3 device-minutes.
    timeout 400 python3 -m folovllm bench step --model random:qwen3-8b --milestone M4 M7/gptq M7/gptq/eager \
      --batch-size 1 --prompt-len 128 --no-timeline --out "$OUT/M7-step-$gpu.json" > "$OUT/step.log" 2>&1
    echo "step: exit $?" ;;
  permstalls)
    # #15, eighteenth session: Nsight Compute on the tuned Gluon plans of gate_up_proj and down_proj at M = 1
    # (m7_ws_stalls.py): issue-slot use and warps stalled per issued instruction, by reason. About 2 device-minutes.
    timeout 300 /usr/local/cuda/bin/ncu --kernel-name gptq_decode_ws_kernel --section WarpStateStats \
      --section SchedulerStats --section SpeedOfLight --page raw --csv \
      python3 milestones/results/m7_ws_stalls.py run > "$OUT/stalls.csv" 2> "$OUT/ncu.err"
    echo "ncu: exit $?"
    python3 milestones/results/m7_ws_stalls.py collect "$OUT/stalls.csv" "$OUT/M7-ws-stalls-$gpu.json" ;;
  pdl)
    # #15, nineteenth session, run at 9db752b (check that commit out first: the code was reverted after this run,
    # since TPOT did not move): programmatic dependent launch (triton_utils/pdl.py there): the norm, SiLU and
    # attention kernels let the next kernel start, and the Gluon kernel streams its first ring stages' words before
    # griddepcontrol.wait. GPU tests, then the kernel table (with and without PDL side by side), weight memory and
    # batch-1 TPOT (gptq and gptq-no-pdl beside bf16), then the decode step profile. About 4 device-minutes.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_pdl.py \
      tests/test_fused_ops.py tests/test_triton_attention.py 2>&1 | tail -3
    timeout 280 python3 -m folovllm bench gptq --m 1 4 16 --out "$OUT/M7-pdl-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    timeout 160 python3 -m folovllm bench step --model random:qwen3-8b --milestone M4 M7/gptq M7/gptq/no-pdl \
      --batch-size 1 --prompt-len 128 --no-timeline --out "$OUT/M7-pdl-step-$gpu.json" > "$OUT/step.log" 2>&1
    echo "step: exit $?" ;;
  gaps)
    # #15, nineteenth session: where a batch-1 decode step leaves the GPU idle, by the kernel after each gap
    # (m7_gaps.py), bf16 (M4) beside GPTQ and GPTQ on the Triton twins. About 2 device-minutes.
    timeout 300 python3 milestones/results/m7_gaps.py "$OUT/M7-gaps-$gpu.json" ;;
  sametpot)
    # #15, nineteenth session, after gaps showed M6's bf16 graph idle like GPTQ's: batch-1 TPOT with a bf16 row on
    # M7's preset (bf16-m7) beside M4's, so GPTQ's ratio can be read against the same preset. About 3 device-minutes.
    timeout 400 python3 -m folovllm bench gptq --m 1 --out "$OUT/M7-sametpot-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -3 "$OUT/gptq.log" ;;
  lmhead)
    # #15, nineteenth session: lm_head in 4 bits (GPTQ checkpoints' lm_head: true; random:qwen3-8b through
    # hf_overrides). The sweep of lm_head's shape (4096 x 151936) at M = 1 tunes its plan into the table; then the
    # kernel table at M = 1, weight memory and batch-1 TPOT with gptq-lm-head beside gptq and bf16; then the step
    # profile. About 6 device-minutes.
    timeout 200 python3 -m folovllm bench gptq --lm-head --kernels-only --sweep-m 1 --m 1 \
      --out "$OUT/M7-lmhead-sweep-$gpu.json" > "$OUT/sweep.log" 2>&1; echo "sweep: exit $?"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    timeout 240 python3 -m folovllm bench gptq --m 1 --out "$OUT/M7-lmhead-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    timeout 150 python3 -m folovllm bench step --model random:qwen3-8b --milestone M4 M7/gptq M7/gptq/lm-head \
      --batch-size 1 --prompt-len 128 --no-timeline --out "$OUT/M7-lmhead-step-$gpu.json" > "$OUT/step.log" 2>&1
    echo "step: exit $?" ;;
  wide)
    # #15, twentieth session: the Gluon kernel with 32 or 64 rows per product (M 17-64, the decode batches of W).
    # The GPU tests, the sweep at M = 64 (tunes the 17-64 rows entries), the kernel table at M = 16, 32, 64, then
    # W bf16 vs GPTQ, each twice, interleaved. About 8 device-minutes.
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 240 python3 -m folovllm bench gptq --kernels-only --sweep-m 64 --m 16 32 64 \
      --out "$OUT/M7-wide-sweep-$gpu.json" > "$OUT/sweep.log" 2>&1; echo "sweep: exit $?"; tail -2 "$OUT/sweep.log"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    timeout 230 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7/gptq M7 M7/gptq \
      --out "$OUT/M7-throughput-wide-$gpu.json" > "$OUT/w.log" 2>&1; echo "W: exit $?"; tail -4 "$OUT/w.log" ;;
  gaporder)
    # #15, twentieth session: the gapswitches list last to first, each engine profiled twice, with the memory left
    # allocated before each engine: do the gaps follow the config or the order? About 3 device-minutes.
    timeout 300 python3 milestones/results/m7_gaps.py --switches --reverse "$OUT/M7-gaps-order-$gpu.json" ;;
  gapsequence)
    # #15, twentieth session, after gaporder showed M4 with the gaps too when engines with M5's graph mode came
    # first: M4 twice in one process, then M4, M4 with M5's graph mode, M4 again in another. About 3 device-minutes.
    timeout 200 python3 milestones/results/m7_gaps.py --sequence M4,M4 "$OUT/M7-gaps-m4m4-$gpu.json" > /dev/null 2>&1
    echo "M4,M4: exit $?"
    timeout 250 python3 milestones/results/m7_gaps.py --sequence M4,M4+full-graphs,M4 "$OUT/M7-gaps-m4full-$gpu.json"
    ;;
  gapwall)
    # #15, twentieth session, after gapsequence: the same M4, M4 with M5's graph mode, M4 sequence, twice, with the
    # wall time of 40 unprofiled decode steps per engine: does a step slow down, or only the profiler's view of it?
    for i in 1 2; do
      timeout 200 python3 milestones/results/m7_gaps.py --sequence M4,M4+full-graphs,M4 "$OUT/M7-gaps-wall$i-$gpu.json" \
        > /dev/null 2>&1; echo "run $i: exit $?"
    done ;;
  gapcause)
    # #15, twentieth session, after gapwall: M4, M5's graph mode, M4 again, counting the CUDA graphs still alive
    # before each engine; then the same with a 16-token budget (one mixed-step graph, not the whole ladder).
    timeout 200 python3 milestones/results/m7_gaps.py --sequence M4,M4+full-graphs,M4 "$OUT/M7-gaps-alive-$gpu.json" \
      > /dev/null 2>&1; echo "alive: exit $?"
    timeout 200 python3 milestones/results/m7_gaps.py --sequence M4,M4+full-graphs-16,M4 "$OUT/M7-gaps-16-$gpu.json" \
      > /dev/null 2>&1; echo "16: exit $?" ;;
  graphgaps)
    # #15, twentieth session, after gapcause: the engine left out, 24 graphs of the same 400 tiny kernels captured in
    # one process, time per kernel by capture index. Under a device-minute.
    timeout 120 python3 milestones/results/graph_gaps.py "$OUT/M7-graph-gaps-$gpu.json" ;;
  gaporderfix)
    # #15, twentieth session, after graphgaps: M5 alone in a fresh process, its graphs captured as the engine does
    # (mixed steps first), then in another process with the decode ladder captured first.
    timeout 150 python3 milestones/results/m7_gaps.py --sequence M5 "$OUT/M7-gaps-m5-$gpu.json" > /dev/null 2>&1
    echo "M5: exit $?"
    timeout 150 python3 milestones/results/m7_gaps.py --decode-first --sequence M5 "$OUT/M7-gaps-m5-decode-first-$gpu.json" \
      > /dev/null 2>&1; echo "M5 decode first: exit $?" ;;
  gapcapture)
    # #15, twentieth session, after gaporderfix: one engine with M5's graph mode, decode ladder captured first; the
    # one-sequence decode graph's replay timed right after its capture, after the mixed-step graphs, and when ready.
    timeout 150 python3 milestones/results/gap_capture_probe.py "$OUT/M7-gap-capture-$gpu.json" ;;
  gapactions)
    # #15, twenty-first session, after gapcapture: one engine per process (M5's graph mode without its attention
    # warm-up, with the warm-up before the captures, and M4), its decode graph's replay timed after each of a new
    # Triton kernel, a large-shared-memory one, a 1 GiB allocation, the warm-up and empty_cache. About 4 minutes.
    for mode in ${GAP_MODES:-full-nowarm full-warmfirst m4}; do
      timeout 150 python3 milestones/results/gap_cause_probe.py $mode "$OUT/M7-gap-actions-$mode-$gpu.json"
    done
    # every module's kernels loaded at start instead of on first use
    for mode in ${GAP_EAGER_MODES:-}; do
      CUDA_MODULE_LOADING=EAGER timeout 200 python3 milestones/results/gap_cause_probe.py $mode \
        "$OUT/M7-gap-actions-$mode-eager-loading-$gpu.json"
    done ;;
  gapfix)
    # #15, twenty-first session, after gapactions; run at 03df784, whose attention warm-up compiled its variants
    # without launching them (reverted at 96d08ad: from there the engine launches them again). In one process each,
    # bf16 with M5's graph mode and GPTQ on M7's preset: 40 batch-1 decode steps as built, then with the variants
    # launched. Then batch-1 TPOT (bench gptq --m 1). About 6 minutes.
    for mode in full-serve m7-serve; do
      timeout 150 python3 milestones/results/gap_cause_probe.py $mode "$OUT/M7-gap-fix-$mode-$gpu.json"
    done
    timeout 300 python3 -m folovllm bench gptq --m 1 --out "$OUT/M7-tpot-warmfix-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -3 "$OUT/gptq.log" ;;
  release)
    # #15, twenty-second session, run at 912addb: milestones/results/m7_ws_release.py (removed later; check that
    # commit out) timed the Gluon kernel freeing each word stage once its words sat in registers (early release,
    # reverted: 1-4% slower at the tuned plans) with splits-apart and products-alone twins.
    timeout 480 python3 milestones/results/m7_ws_release.py "$OUT/M7-release-$gpu.json" ;;
  release2)
    # #15, after release, run at 0be1149: ring depths 2-4 with and without early release, M = 1, 4, 16, 64.
    timeout 480 python3 milestones/results/m7_ws_release.py --stages "$OUT/M7-release2-$gpu.json" ;;
  depths)
    # #15, after release2: m7_ws_anatomy.py (ring depths 1-4 of each tuned plan, splits apart, products alone),
    # --pick writes the faster depths into the tuned table (copied to $OUT), then bench gptq with that table.
    timeout 200 python3 milestones/results/m7_ws_anatomy.py "$OUT/M7-anatomy-$gpu.json"
    python3 milestones/results/m7_ws_anatomy.py --pick "$OUT/M7-anatomy-$gpu.json"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    timeout 300 python3 -m folovllm bench gptq --m 1 4 16 64 --out "$OUT/M7-depths-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -3 "$OUT/gptq.log" ;;
  reduce)
    # #15, after depths: the Gluon kernel's split-K reduction reads the other splits' partial sums with all loads in
    # flight (gl.static_range, as split_k.store_tile does; it was a loop of dependent round trips). GPU tests, the
    # anatomy again (--pick keeps or changes the depths), bench gptq with that table, then W's fair pair
    # (M7 preset, bf16 and GPTQ twice each, interleaved). About 8 device-minutes.
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 150 python3 milestones/results/m7_ws_anatomy.py "$OUT/M7-anatomy-reduce-$gpu.json" > "$OUT/anatomy.log" 2>&1
    echo "anatomy: exit $?"; python3 milestones/results/m7_ws_anatomy.py --pick "$OUT/M7-anatomy-reduce-$gpu.json"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    timeout 150 python3 -m folovllm bench gptq --m 1 4 16 64 --out "$OUT/M7-reduce-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    timeout 230 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7/gptq M7 M7/gptq \
      --out "$OUT/M7-throughput-reduce-$gpu.json" > "$OUT/w.log" 2>&1; echo "W: exit $?"; tail -4 "$OUT/w.log" ;;
  nosub)
    # #15, after reduce: what folding the zero point out of the compute loop could save at most. Each tuned plan
    # and its products-alone twin at M = 1 and 16, with the codes' sub.bf16x2 as it is and as a move (wrong values;
    # its loop is 267 machine instructions a block instead of 362). Each in its own process and Triton cache.
    for codes in plain no-sub; do
      TRITON_CACHE_DIR=$(mktemp -d) timeout 150 python3 milestones/results/m7_ws_anatomy.py --codes $codes \
        "$OUT/M7-codes-$codes-$gpu.json" > "$OUT/codes-$codes.log" 2>&1; echo "$codes: exit $?"
    done ;;
  scales)
    # #15, twenty-third session, run at 01a5a91 (check that commit out to run it again; m7_ws_anatomy.py lost its
    # --scales mode when the ring became the only way): zero points and scales through the ring (the loader TMAs
    # them with each block's words) against the compute warps loading them one block ahead; then the GPU tests.
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 300 python3 milestones/results/m7_ws_anatomy.py --scales "$OUT/M7-scales-$gpu.json" > "$OUT/scales.log" 2>&1
    echo "scales: exit $?"; cat "$OUT/scales.log" | cut -c1-400 ;;
  pdlchain)
    # #15, twenty-fourth session: PDL again (de514ef), judged by overlaps this time. GPU tests, then
    # m7_pdl_chain.py: each projection and a layer's chain with and without PDL (kernel overlaps from the
    # profiler), then batch-1 TPOT with and without. About 5 device-minutes.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_pdl.py -k "gluon or ws or pdl" 2>&1 | tail -2
    timeout 400 python3 milestones/results/m7_pdl_chain.py "$OUT/M7-pdl-chain-$gpu.json" --tpot 2>&1 | grep -v Warning ;;
  workqueue)
    # #15, twenty-fourth session, after timelineraw: the Gluon kernel fed from an atomic work queue (resident
    # programs take items until none is left, so fast SMs take more), beside bf16 and the tuned plan, at 1 and 16
    # rows. About 2 device-minutes.
    timeout 240 python3 milestones/results/m7_workqueue.py "$OUT/M7-workqueue-$gpu.json" 2>&1 | grep -v Warn ;;
  workqueue2)
    # #15, after workqueue (every config slower): each program's first item its own, the next ticket asked for as an
    # item starts, items down to a quarter of the tuned split's. It hung on the H200 (killed at 300 s, no row
    # written) and was reverted: the code is m7_workqueue.py at 05fe386. About 5 device-minutes, all lost.
    timeout 300 python3 milestones/results/m7_workqueue.py "$OUT/M7-workqueue2-$gpu.json" 2>&1 | grep -v Warn ;;
  timelineraw)
    # #15, twenty-fourth session: the clocks probe with every program's SM, start and end (global timer), to see
    # which programs make the tail (the slowest program sets the kernel's time). About 1 device-minute.
    timeout 150 python3 milestones/results/m7_ws_timeline.py --raw "$OUT/M7-timeline-raw-$gpu.json" 2>&1 | grep -v Warn | cut -c1-300 ;;
  prefillws)
    # #15, twenty-fifth session, run at 8ca2ced then at the commit after: the Gluon kernel in tiles of 128 rows of X for
    # prefill (grid axis 2; from the second run the operands scaled in bf16, 128 or 256 columns), against the
    # Triton whole-block kernel. GPU tests of the kernel, the sweep at 256 rows (writes the tuned table's 256-row
    # plans, copied to $OUT), then the kernel table at 64-4096 rows with it. About 8 device-minutes.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 330 python3 -m folovllm bench gptq --kernels-only --sweep --sweep-m 256 --m 64 256 1024 4096 \
      --out "$OUT/M7-prefill-ws-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -20 "$OUT/gptq.log"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  prefillws2)
    # #15, after prefillws: prefill plans tuned at 256 rows (up to 1024) and at 4096 (more), with 128 or 256 columns
    # and one or two programs per SM; GPU tests, the sweep at both sizes (writes the table, copied to $OUT), the kernel
    # table at 64-4096 rows with it. About 9 device-minutes.
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 420 python3 -m folovllm bench gptq --kernels-only --sweep --sweep-m 256 4096 --m 64 256 1024 2048 4096 \
      --out "$OUT/M7-prefill-ws2-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; grep -v '^ ' "$OUT/gptq.log" | tail -5
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  prefilll2)
    # #15, after prefillw: Nsight Compute on the prefill kernel at 4096 rows (m7_prefill_l2.py): the tuned 256-column
    # plan, the same at 128 columns and cuBLAS bf16 on qkv_proj and gate_up_proj; time, bytes through L2 and read
    # from DRAM, speed-of-light and compute sections. About 3 device-minutes.
    timeout 300 /usr/local/cuda/bin/ncu --kernel-name regex:'gptq|gemm|nvjet|xmma|cutlass' --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --metrics lts__t_bytes.sum,dram__bytes_read.sum --page raw --csv \
      python3 milestones/results/m7_prefill_l2.py run > "$OUT/prefill-l2.csv" 2> "$OUT/ncu.err"
    echo "ncu: exit $?"; tail -3 "$OUT/ncu.err"
    python3 milestones/results/m7_prefill_l2.py collect "$OUT/prefill-l2.csv" "$OUT/M7-prefill-l2-$gpu.json" ;;
  prefilll2collect)
    # #15: the first prefilll2 run (73c939e) profiled fine and its collect step stopped on ncu's unit "ns"; its CSV
    # (carried as .devcarry/prefill-l2.csv, kept as milestones/results/M7-prefill-l2-h200.csv) collected again here.
    python3 milestones/results/m7_prefill_l2.py collect .devcarry/prefill-l2.csv "$OUT/M7-prefill-l2-$gpu.json" ;;
  prefillw)
    # #15, after prefillws2 (its table committed): the GPU tests of quantized models and CUDA graphs, W's fair pair,
    # and TTFT/TPOT at one row. About 8 device-minutes.
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py tests/test_cuda_graph.py \
      -k "on_gpu or cuda or gpu or graph" 2>&1 | tail -2
    timeout 230 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7/gptq M7 M7/gptq \
      --out "$OUT/M7-throughput-prefill-$gpu.json" > "$OUT/w.log" 2>&1; echo "W: exit $?"; tail -4 "$OUT/w.log"
    timeout 200 python3 -m folovllm bench gptq --m 1 --out "$OUT/M7-prefill-tpot-$gpu.json" > "$OUT/tpot.log" 2>&1
    echo "tpot: exit $?"; tail -8 "$OUT/tpot.log" ;;
  pdlengine)
    # #15, twenty-fourth session: PDL adopted (the Gluon kernel launched with it; norm, SiLU, attention let it start).
    # GPU tests of the kernels it touches and of CUDA graphs, bench gptq (kernels alone, then TPOT with PDL), W's
    # fair pair. About 9 device-minutes.
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_pdl.py \
      tests/test_triton_attention.py tests/test_cuda_graph.py tests/test_fused_ops.py tests/test_quantization.py \
      -k "gluon or ws or on_gpu or pdl or cuda or gpu or graph or h200" 2>&1 | tail -2
    timeout 170 python3 -m folovllm bench gptq --m 1 4 16 64 --out "$OUT/M7-pdl-engine-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -8 "$OUT/gptq.log"
    timeout 230 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7/gptq M7 M7/gptq \
      --out "$OUT/M7-throughput-pdl-$gpu.json" > "$OUT/w.log" 2>&1; echo "W: exit $?"; tail -4 "$OUT/w.log" ;;
  pdlrepeat)
    # #15, twenty-fourth session, after pdlchain: TPOT with and without PDL again in the other order, and the
    # clocks probe with the global timer (the SM clock's real rate, each kernel's span). About 4 device-minutes.
    timeout 300 python3 milestones/results/m7_pdl_chain.py "$OUT/M7-pdl-tpot-h200.json" --tpot-only 2>&1 | grep -v Warn
    timeout 150 python3 milestones/results/m7_ws_timeline.py "$OUT/M7-timeline-global-$gpu.json" 2>&1 | grep -v Warn ;;
  ringscales)
    # #15, after scales: the ring brings the zero points and scales (the only way now). GPU tests, the anatomy
    # (--pick writes the faster depths), bench gptq with that table, W's fair pair, then the mma.sync prototype's
    # second sweep (prefetch depth, X ahead or not). About 9 device-minutes.
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_quantization.py -k "gluon or ws or on_gpu" 2>&1 | tail -2
    timeout 150 python3 milestones/results/m7_ws_anatomy.py "$OUT/M7-anatomy-ring-$gpu.json" > "$OUT/anatomy.log" 2>&1
    echo "anatomy: exit $?"; python3 milestones/results/m7_ws_anatomy.py --pick "$OUT/M7-anatomy-ring-$gpu.json"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    timeout 150 python3 -m folovllm bench gptq --m 1 4 16 64 --out "$OUT/M7-ring-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    timeout 230 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7/gptq M7 M7/gptq \
      --out "$OUT/M7-throughput-ring-$gpu.json" > "$OUT/w.log" 2>&1; echo "W: exit $?"; tail -4 "$OUT/w.log"
    timeout 200 python3 milestones/results/m7_mma_decode.py --sweep2 "$OUT/M7-mma-decode2-$gpu.json" ;;
  mmadecode)
    # #15, twenty-third session: the mma.sync prototype (m7_mma_decode.py: warps split K inside a program, loads
    # straight from global memory one block ahead) beside the tuned Gluon plans and bf16 at M = 1, 4, 16.
    timeout 420 python3 milestones/results/m7_mma_decode.py "$OUT/M7-mma-decode-$gpu.json" ;;
  streamk)
    # #15, twenty-third session, after ringscales: the Gluon kernel as a persistent stream-K launch (m7_streamk.py:
    # P programs, a multiple of the SM count, each one contiguous run of tile-major work items through one ring)
    # beside the tuned plans and bf16 at M = 1, 4, 16. About 2 device-minutes.
    timeout 300 python3 milestones/results/m7_streamk.py "$OUT/M7-streamk-$gpu.json" ;;
  streamk2)
    # #15, after streamk (0246d58 wrote every partial sum in full, M_TILE rows, where the tuned plans write X's rows
    # only): the same sweep with the partial sums masked to X's rows.
    timeout 300 python3 milestones/results/m7_streamk.py "$OUT/M7-streamk2-$gpu.json" ;;
  refactor)
    # #15, after streamk2: load_block and block_product taken out of the Gluon kernel's partitions (the stream-K probe
    # uses them too; its loops compile to the same machine code). GPU tests, then the kernel table at M = 1 and 16.
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_quantization.py -k "gluon or ws or on_gpu" 2>&1 | tail -2
    timeout 200 python3 -m folovllm bench gptq --kernels-only --m 1 16 --out "$OUT/M7-refactor-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; tail -12 "$OUT/gptq.log" ;;
  pingpong)
    # #15, after refactor: two compute warpgroups per loader (m7_pingpong.py: the second takes every other K block of
    # the same ring and hands its sum over through shared memory) beside the tuned plans at M = 1, 4, 16; GPU tests
    # first (store_tile taken out of the kernel: its machine code is the same).
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py 2>&1 | tail -2
    timeout 300 python3 milestones/results/m7_pingpong.py "$OUT/M7-pingpong-$gpu.json" ;;
  timeline)
    # #15, after pingpong: the tuned plans at M = 1 with the SM's cycle counter read inside each program (start, each
    # stage landed, last product, epilogue end; m7_ws_timeline.py). About 1 device-minute.
    timeout 200 python3 milestones/results/m7_ws_timeline.py "$OUT/M7-timeline-$gpu.json" ;;
  timelinestages)
    # #15, after timeline: the same clocks with each tuned plan at 1, 2 and 4 ring stages.
    timeout 250 python3 milestones/results/m7_ws_timeline.py --stages "$OUT/M7-timeline-stages-$gpu.json" ;;
  readfloor)
    # #15, twenty-first session: the fastest any W4A16 kernel could be on Qwen3-8B's projections, timed as bench gptq
    # times ours: an empty launch and pure reads of each layer's GPTQ bytes, beside bf16 and our kernel at M = 1, 16.
    timeout 200 python3 milestones/results/m7_read_floor.py "$OUT/M7-read-floor-$gpu.json" ;;
  gapswitches)
    # #15, nineteenth session, after gaps: which of M5's and M6's changes brings the 0.4-0.5 us gaps before each
    # kernel of a decode graph (bf16, M4 with each change alone, then M5 and M6). About 2 device-minutes.
    timeout 300 python3 milestones/results/m7_gaps.py --switches "$OUT/M7-gaps-switches-$gpu.json" ;;
  saturatedseeds)
    # Ninth session, after m5saturated (03129fe): the 32 req/s run again with two more arrival seeds, M4 beside
    # the fixed budgets and the dynamic mode at 15 ms, so the claim rests on three runs, not one.
    s="--workload mixed --num-prompts 160 --output-len 100:512 --long-fraction 0.15 --collect-step-stats"
    for seed in 1 2; do
      timeout 280 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 $s --seed $seed \
        --request-rate 32 --milestone M5@12 M4@12 M4 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=15 \
        --out "$OUT/M5-saturated-32-seed$seed-$gpu.json" > "$OUT/sat-$seed.log" 2>&1; echo "seed $seed: exit $?"
    done ;;
  ninthheadlines)
    # Ninth session (03129fe): M5-M7 headlines after the host-wait fix. M6's 256 shared-prompt requests (stage
    # m6spec; its JSON, written as M6-shared-256, is kept as M6-shared-256-nosync beside the earlier run), W with
    # M4, M5 and M6, W bf16 vs GPTQ on qwen3-8b; then M4 vs M5 at 16 req/s (stage m5preset's serve part; seeds
    # 0, 1, 2) and M6's TTFT hit vs miss; then qwen3-8b at 12 req/s (seeds 0 and 1), where the 8B model is loaded,
    # with the fixed budgets and the dynamic mode at 20 ms. About 13 device-minutes in four calls.
    bash "$0" m6spec
    timeout 130 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 \
      --milestone M4 M4 M5 M6 --out "$OUT/M5-W-nosync-$gpu.json" > /dev/null 2>&1; echo "W: exit $?"
    timeout 220 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7 M7/gptq M7/gptq \
      --out "$OUT/M7-throughput-nosync-$gpu.json" > /dev/null 2>&1; echo "W8b: exit $?"
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    for seed in 0 1 2; do
      tag=$([ $seed = 0 ] && echo "" || echo "-seed$seed")
      timeout 220 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 100 --request-rate 16 \
        --seed $seed --milestone M5@12 M4@12 M4 M5 --out "$OUT/M5-preset-nosync$tag-$gpu.json" > /dev/null 2>&1
    done
    timeout 200 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M4 M6 --parts ttft \
      --num-prompts 128 --out "$OUT/M6-ttft-nosync-$gpu.json" > "$OUT/prefix.log" 2>&1; echo "prefix: exit $?"
    for seed in 0 1; do
      tag=$([ $seed = 0 ] && echo "" || echo "-seed$seed")
      timeout 420 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
        --seed $seed --milestone M5@12 M4@12 M4 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=20 \
        --out "$OUT/M5-saturated-12-qwen3-8b$tag-$gpu.json" > /dev/null 2>&1; echo "8b seed $seed: exit $?"
    done ;;
  m5fitinputs)
    # #13, prepared in the ninth session, run in the tenth at e439b69 (each row's recorded window was the run's last
    # 256 steps, all decode-only, so it showed nothing of the fit's prompt steps; stage m5calibrated followed): why the dynamic mode's fits on the GPU are not identified
    # (six runs priced a 512-token chunk at 2.9-86 ms). Rows now record the fit's inputs (cost_model.window: each
    # kept step's features, seconds, whether that is the forward or the interval between back-to-back steps, and
    # the fit's prediction). The saturated runs where the target was missed: qwen3-0.6b at 32 req/s (seed 1) and
    # qwen3-8b at 12 req/s (seed 0), dynamic rows with budget 512 beside them. About 4 device-minutes.
    s="--workload mixed --output-len 100:512 --long-fraction 0.15 --collect-step-stats --max-model-len 9216"
    timeout 200 python3 -m folovllm bench serve --model random:qwen3-0.6b $s --num-prompts 160 --request-rate 32 \
      --seed 1 --milestone M5@12 M5 M5/budget=8192/itl=15 --out "$OUT/M5-fit-inputs-$gpu.json" > /dev/null 2>&1
    echo "0.6b: exit $?"
    timeout 200 python3 -m folovllm bench serve --model random:qwen3-8b $s --num-prompts 100 --request-rate 12 \
      --seed 0 --milestone M5@12 M5 M5/budget=8192/itl=20 --out "$OUT/M5-fit-inputs-qwen3-8b-$gpu.json" \
      > /dev/null 2>&1; echo "8b: exit $?" ;;
  m5calibrated)
    # #13, tenth session: the dynamic mode after open-loop calibration (StepCostModel.calibrate: the terms fitted
    # once from designed steps timed at start-up; serving's steps teach only the tail factor). m5fitinputs showed
    # the last window of every run is decode-only, so the closed-loop fits could not be inspected there; the
    # saturated runs again instead: qwen3-0.6b at 32 req/s (seeds 0, 1, 2; target 15 ms) beside the fixed
    # budgets, then (m5calibrated8b) qwen3-8b at 12 req/s (seeds 0, 1; target 20 ms). About 5 + 5 device-minutes.
    s="--workload mixed --num-prompts 160 --output-len 100:512 --long-fraction 0.15 --collect-step-stats"
    for seed in 0 1 2; do
      timeout 190 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 $s --seed $seed \
        --request-rate 32 --milestone M5@12 M5/budget=256 M5 M5/budget=2048 M5/budget=8192/itl=15 \
        --out "$OUT/M5-calibrated-32-seed$seed-$gpu.json" > "$OUT/cal-$seed.log" 2>&1; echo "seed $seed: exit $?"
    done ;;
  m5calibrated8b)
    s="--workload mixed --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --collect-step-stats"
    for seed in 0 1; do
      timeout 280 python3 -m folovllm bench serve --model random:qwen3-8b --max-model-len 9216 $s --seed $seed \
        --request-rate 12 --milestone M5@12 M5/budget=256 M5 M5/budget=8192/itl=20 \
        --out "$OUT/M5-calibrated-12-qwen3-8b-seed$seed-$gpu.json" > "$OUT/cal8b-$seed.log" 2>&1; echo "8b seed $seed: exit $?"
    done ;;
  nosynccheck)
    # After nosync: the GPU tests the earlier stages of the session did not run (paged and split attention,
    # whose store moved into AttentionBackend.forward; the skinny GEMM; Inductor), then the two M4 chapters
    # exported as scripts (`run_gpu.sh chapters DIR` with DIR holding M4_fast_path.py, M4_flash_attention.py).
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_skinny_gemm.py \
      tests/test_compile.py 2>&1 | tail -4 ;;
  gemvwide)
    # Run at 8c893f1 (its GPU tests found 2-bit whole-block prefill plans over the shared-memory limit, since
    # fixed): the W4A16 sweep after the sixth session's kernels: the one-row FMA kernel's wider grid (tiles
    # of 32 columns, 2 warps, up to 16 splits of 2 blocks: 640d064's fastest plans sat at the old grid's edge),
    # the swapped-operand tl.dot kernel (wgmma) beside the plain one at M = 4 and 16, and prefill plans at M = 64
    # and 256 with whole dequantized blocks (block_dot) beside sliced tiles; the tuned table is rewritten and
    # copied back, then the kernel table at every M. About 9 device-minutes; then stage gptqtpot.
    python3 -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "kernel_matches or permutes or bf16_plans" 2>&1 | tail -2
    timeout 540 python3 -m folovllm bench gptq --kernels-only --sweep --m 1 4 16 64 256 4096 \
      --out "$OUT/M7-sweep6-$gpu.json" > "$OUT/gptq.log" 2>&1; echo "gptq: exit $?"
    cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/" ;;
  gptqtpot)
    # Run at 8c893f1 with gemvwide's tuned table copied into the tree (committed in c274352, which the JSON
    # names): weight memory and batch-1 TPOT bf16 vs GPTQ, and W's fair pair (stage gptqW) to see what the
    # prefill plans change there. About 7 device-minutes.
    timeout 300 python3 -m folovllm bench gptq --m 1 16 256 --out "$OUT/M7-tpot7-$gpu.json" > "$OUT/tpot.log" 2>&1
    echo "tpot: exit $?"
    timeout 280 python3 -m folovllm bench throughput --model random:qwen3-8b --max-model-len 2048 \
      --kv-cache-memory 17179869184 --subset 64 --milestone M7 M7 M7/gptq M7/gptq \
      --out "$OUT/M7-throughput7-$gpu.json" > /dev/null 2>&1; echo "W: exit $?" ;;
  skinny2)
    # Run at 606708c (its tuned table then held M = 1, 2 and 4 plans; 4e7a920 keeps M = 1 only): the skinny GEMM rebuilt without a loop (each program loads its whole tile at once; split-K
    # through the counters of split_k.py) swept against cuBLAS on qwen3-0.6b's projections at M = 1, 2, 4; the
    # plans that win by 5% go to ops/configs/skinny_gemm_<GPU>.json (copied back), then batch-1 TPOT with the
    # table and with cuBLAS only, same process; then W with five repeats. About 6 device-minutes.
    python3 -m pytest -q -p no:cacheprovider tests/test_skinny_gemm.py tests/test_flash_attention.py 2>&1 | tail -2
    timeout 420 python3 -m folovllm bench gemm --model random:qwen3-0.6b --m 1 2 4 --sweep \
      --out "$OUT/M4-skinny2-qwen3-0.6b-$gpu.json" > "$OUT/gemm.log" 2>&1; echo "gemm: exit $?"
    cp src/folovllm/model_executor/layers/ops/configs/*.json "$OUT/" 2>/dev/null
    # W under M4 with five repeats in one process (two at 640d064 spread 19,264-21,483 tok/s around #11's 21,000)
    timeout 200 python3 -m folovllm bench throughput --model random:qwen3-0.6b --max-model-len 2048 --repeat 5 \
      --milestone M4 --out "$OUT/M4-W-repeats-$gpu.json" > /dev/null 2>&1; echo "W: exit $?" ;;
  m5dynamic2|m5tail)
    # M5 dynamic chunk sizing beside fixed budgets: on qwen3-0.6b (16 req/s) beside budgets 256 and 512; on
    # qwen3-8b (8 req/s), whose decode-only step alone takes ~10 ms, targets 15 / 20 / 30 ms beside the same
    # budgets. m5dynamic2 (640d064): the cost model keeps its last full fit and learns the step interval;
    # m5tail (606708c): the scheduler also aims below the target by the model's tail factor.
    name=$([ "$1" = m5tail ] && echo tail || echo kept-fit)
    s="--workload mixed --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --seed 0 --collect-step-stats"
    timeout 200 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 $s --request-rate 16 \
      --milestone M5@12 M4@12 M5/budget=256 M5 M5/budget=8192/itl=10 M5/budget=8192/itl=20 \
      --out "$OUT/M5-dynamic-$name-$gpu.json" > "$OUT/dyn06.log" 2>&1; echo "0.6b: exit $?"
    timeout 330 python3 -m folovllm bench serve --model random:qwen3-8b --max-model-len 9216 $s --request-rate 8 \
      --milestone M5@12 M5/budget=256 M5 M5/budget=8192/itl=15 M5/budget=8192/itl=20 M5/budget=8192/itl=30 \
      --out "$OUT/M5-dynamic-$name-qwen3-8b-$gpu.json" > "$OUT/dyn8b.log" 2>&1; echo "8b: exit $?" ;;
  m5check)
    # M5: chunked prefill (budget 256, prompts 700-3400) gives M4's greedy tokens in bf16 on the GPU
    python3 - <<'PY'
from folovllm import LLM, SamplingParams
prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 10000 for j in range(700 + 900 * i)]} for i in range(4)]
params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
runs = {}
for name, kw in {"M4": {}, "M5/budget=256": dict(max_num_batched_tokens=256)}.items():
    llm = LLM("random:qwen3-0.6b", milestone=name[:2], max_model_len=4096, kv_cache_memory=2**30, **kw)
    runs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
same = sum(a == b for x, y in zip(runs["M4"], runs["M5/budget=256"]) for a, b in zip(x, y))
print(f"M5/budget=256: {same}/{sum(map(len, runs['M4']))} greedy tokens equal to M4 (bf16, prompts 700-3400)")
PY
 ;;
  m5)
    # M5 chunked prefill on the mixed workload (15% of the prompts 4k-8k tokens among W-like short ones,
    # Poisson arrivals at 16 req/s, where M4 is loaded), one process, one JSON: M4 vs M5 (budget 2048),
    # the chunk-size sweep 256..8192, and dynamic sizing (target ITL 10 / 20 ms under an 8192 ceiling)
    # against those fixed budgets. The first row (12 requests) pays Triton's JIT for chunk shapes. ~4 min.
    bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed --num-prompts 100 \
      --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --milestone M5/budget=512@12 M4 M5 \
      M5/budget=256 M5/budget=512 M5/budget=1024 M5/budget=4096 M5/budget=8192 M5/budget=8192/itl=10 \
      M5/budget=8192/itl=20 --out "$OUT/M5-serve-mixed-$gpu.json" > "$OUT/serve.log" 2>&1 ;;
  m5dynamic)
    # M5 dynamic chunk sizing after the cost model learned the eager step's price (commit a0436ce): the same mixed
    # workload as stage m5, with M4, M5 and the 8192 budget beside the targets 10 / 15 / 20 ms, in one process.
    bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed --num-prompts 100 \
      --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --milestone M5/budget=512@12 M4 M5 \
      M5/budget=8192 M5/budget=8192/itl=10 M5/budget=8192/itl=15 M5/budget=8192/itl=20 \
      --out "$OUT/M5-dynamic-$gpu.json" > "$OUT/dynamic.log" 2>&1 ;;
  m5steps)
    # Not yet run. #13 next: the same mixed workload with the engine's own step records per row (decode-only
    # steps vs steps with prompt tokens: what sets the 33-40 ms ITL tail) and the dynamic mode's fitted cost
    # model, after the LinAlgError fix; 3 rows, ~2 min.
    bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed --num-prompts 100 \
      --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 --collect-step-stats \
      --milestone M5/budget=512@12 M4 M5 M5/budget=8192/itl=20 --out "$OUT/M5-steps-$gpu.json" > "$OUT/steps.log" 2>&1 ;;
  llama)
    # #11: batch-1 TPOT and TTFT of the M4 fast path on random:llama-3.2-1b (target TPOT <= 1.5 ms), HF alongside
    bench latency --model random:llama-3.2-1b --milestone M4 --input-len 128 2048 --output-len 128 \
      --out "$OUT/M4-fastpath-latency-llama-3.2-1b-$gpu.json" > "$OUT/lat.log" 2>&1 ;;
  gptq)
    # M7: the decode-plan sweep (writes the tuned plans under quantization/ops/configs/), then kernels vs cuBLAS
    # timed in CUDA graphs, weight memory and batch-1 TPOT (one JSON), then workload W (64-prompt subset)
    # bf16 vs GPTQ on random:qwen3-8b. Kernel tests: stage gptqsweep.
    timeout 330 python3 -m folovllm bench gptq --sweep --out "$OUT/M7-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"; cp src/folovllm/model_executor/layers/quantization/ops/configs/*.json "$OUT/"
    w="--model random:qwen3-8b --max-model-len 2048 --kv-cache-memory 17179869184 --subset 64"
    timeout 100 python3 -m folovllm bench throughput $w --milestone M4 --out "$OUT/M7-throughput-bf16-$gpu.json" >/dev/null
    timeout 100 python3 -m folovllm bench throughput $w --milestone M7 --quantization gptq \
      --out "$OUT/M7-throughput-gptq-$gpu.json" > /dev/null; echo "throughput: exit $?" ;;
  gputests)
    # #15, twenty-sixth session: every GPU test of M7's kernels, PDL, attention, CUDA graphs and quantized models at
    # the session's commit (the twenty-fifth session's review commits had not run on a GPU), including the engine
    # test whose prefill and decode steps run the Gluon kernels against the reference's tokens. About 4 device-minutes.
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gluon_gptq.py tests/test_pdl.py \
      tests/test_triton_attention.py tests/test_cuda_graph.py tests/test_fused_ops.py tests/test_quantization.py \
      -k "gluon or ws or on_gpu or pdl or cuda or gpu or graph or h200 or engine" -rs 2>&1 | tail -6 ;;
  reduceab)
    # #15, twenty-sixth session: an A/B of gluon_gptq.py's split-K reduction at 16 rows in one device call. OLD is the
    # file as of the commit before (carried as .devcarry/old/gluon_gptq.py), NEW the checkout's; alternated twice.
    # Stage `reducespill` (d0bd51a, OLD from ca1dc1e): the loads of a 16-row tile's partial sums bounded to 64
    # registers; stage `reducevec` (46c527f, OLD from d0bd51a): the partial sums in 16-byte copies. ~2 device-minutes.
    f=src/folovllm/model_executor/layers/quantization/ops/gluon_gptq.py
    cp "$f" /tmp/new_gluon_gptq.py
    for r in 1 2; do for v in old new; do
      if [ "$v" = old ]; then cp .devcarry/old/gluon_gptq.py "$f"; else cp /tmp/new_gluon_gptq.py "$f"; fi
      timeout 150 python3 -m folovllm bench gptq --m 16 --kernels-only --out "$OUT/ab-$v-$r.json" > "$OUT/ab-$v-$r.log" 2>&1
      echo "$v $r: exit $?"
    done; done
    cp /tmp/new_gluon_gptq.py "$f" ;;
  vecengine)
    # #15, twenty-sixth session, after reducevec: the kernel table at 1-64 rows, weight memory and batch-1 TPOT at
    # 46c527f. About 1 device-minute with warm caches.
    timeout 260 python3 -m folovllm bench gptq --m 1 4 16 64 --out "$OUT/M7-vec-$gpu.json" > "$OUT/vec.log" 2>&1
    echo "gptq: exit $?" ;;
  final)
    # The last device minutes of the session, trimmed to fit: M7's kernels/memory/TPOT, M6's TTFT hit vs miss
    # and shared-prompt throughput, M5 vs M4 on the mixed workload (each bounded; JSONs land as they finish)
    timeout 170 python3 -m folovllm bench gptq --out "$OUT/M7-$gpu.json" > "$OUT/gptq.log" 2>&1
    echo "gptq: exit $?"
    timeout 170 python3 -m folovllm bench prefix --model random:qwen3-8b --milestone M4 M6 --parts ttft throughput \
      --num-prompts 128 --out "$OUT/M6-prefix-$gpu.json" > "$OUT/prefix.log" 2>&1
    echo "prefix: exit $?"
    timeout 110 python3 -m folovllm bench serve --model random:qwen3-0.6b --max-model-len 9216 --workload mixed \
      --num-prompts 100 --output-len 100:512 --long-fraction 0.15 --request-rate 16 --seed 0 \
      --milestone M5@12 M4 M5 --out "$OUT/M5-serve-mixed-$gpu.json" > "$OUT/serve.log" 2>&1
    echo "serve: exit $?" ;;
  chapters)
    # Chapters exported here with `jupyter nbconvert --to script notebooks/*.ipynb --output-dir DIR`
    # (DIR travels as a carried path; CHAPTER_TIMEOUT bounds each script, default 900 s). The GPU box has no IPython: a two-function stand-in
    # (get_ipython -> None, display -> print) lets the scripts run unchanged.
    dir=${2:?usage: run_gpu.sh chapters DIR}
    stub=$(mktemp -d)
    if ! python3 -c "import IPython" 2>/dev/null; then
      mkdir -p "$stub/IPython"
      printf 'version_info = (8, 12, 0)\n\ndef get_ipython():\n    return None\n' > "$stub/IPython/__init__.py"
      printf 'def display(*objs):\n    print(*objs, sep="\\n")\n\nclass Code(str):\n    def __new__(cls, data, language=None):\n        return str.__new__(cls, data)\n' > "$stub/IPython/display.py"
    fi
    for script in "$dir"/M*.py; do
      name=$(basename "$script" .py)
      start=$(date +%s)
      PYTHONPATH=src:$stub MPLBACKEND=Agg timeout "${CHAPTER_TIMEOUT:-900}" python3 "$script" > "$OUT/$name-$gpu.log" 2>&1
      echo "$name: exit $? in $(( $(date +%s) - start )) s"
    done ;;
esac
