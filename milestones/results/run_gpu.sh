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
      --subset 64 --milestone M4 M3 M4 --out "$OUT/M4-$gpu.json" > /dev/null ;;  # M4 twice: run-to-run spread
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
  chapters)
    # Chapters exported here with `jupyter nbconvert --to script notebooks/*.ipynb --output-dir DIR`
    # (DIR travels as a carried path). The GPU box has no IPython: a two-function stand-in
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
      PYTHONPATH=src:$stub MPLBACKEND=Agg python3 "$script" > "$OUT/$name-$gpu.log" 2>&1
      echo "$name: exit $? in $(( $(date +%s) - start )) s"
    done ;;
esac
