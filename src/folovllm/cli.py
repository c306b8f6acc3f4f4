"""``folovllm`` command line: ``generate``, ``serve``, ``quantize``, ``eval perplexity`` and
``bench {latency,throughput,attention,prefill,step,serve,prefix,gptq,gemm}``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from folovllm.benchmarks.common import parse_range, write_results
from folovllm.config import BUILT_MILESTONES


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="HF folder, 'smollm2-135m' (embedded) or 'random:<preset>'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--quantization", default=None, help="'gptq' insists on GPTQ weights (random codes for random:)")
    p.add_argument("--hf-overrides", type=_json_object, default=None, help="HF config fields as a JSON object (vLLM's flag)")


def _json_object(text: str) -> dict:
    """``--hf-overrides``'s value: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return value


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("max_model_len", "kv_cache_memory", "max_num_seqs", "block_size", "quantization", "hf_overrides",
            "collect_step_stats")  # fmt: skip
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folovllm", description="FoloVLLM: a teaching vLLM-v1-style engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text, streamed as it is produced")
    _engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--milestone", default=None)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)")
    _engine_args(srv)
    srv.add_argument("--milestone", default=None)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="the name clients use (default: --model)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    qnt = sub.add_parser("quantize", help="write a GPTQ-format checkpoint, quantized by GPTQ or RTN")
    qnt.add_argument("--model", required=True, help="HF folder, 'smollm2-135m' or 'random:<preset>'")
    qnt.add_argument("--out", required=True, help="folder to write the checkpoint into")
    qnt.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    qnt.add_argument("--bits", type=int, default=4)
    qnt.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    qnt.add_argument("--desc-act", action="store_true", help="act-order: largest inputs first")
    qnt.add_argument("--sym", action="store_true", help="symmetric grid (zero point fixed at the middle)")
    qnt.add_argument("--calib-samples", type=int, default=32)
    qnt.add_argument("--calib-seq-len", type=int, default=256)
    qnt.add_argument("--damp-percent", type=float, default=0.01)
    qnt.add_argument("--seed", type=int, default=0)
    qnt.add_argument("--device", default=None, help="where to quantize (default: cpu)")
    qnt.add_argument("--lm-head", action="store_true", help="quantize lm_head too (untied from the embeddings)")

    ev = sub.add_parser("eval", help="quality measures, printed as JSON").add_subparsers(dest="eval", required=True)
    ppl = ev.add_parser("perplexity", help="perplexity on the held-out split of Python's docs")
    ppl.add_argument("--model", default="smollm2-135m")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    ppl.add_argument("--seq-len", type=int, default=512, help="tokens per scored window")
    ppl.add_argument("--device", default=None)
    ppl.add_argument("--dtype", default=None)
    ppl.add_argument("--quantization", default=None, help="'gptq' insists on GPTQ weights")
    ppl.add_argument("--out", default=None)

    bench = sub.add_parser("bench", help="benchmarks that write results JSON").add_subparsers(dest="bench", required=True)
    lat = bench.add_parser("latency", help="TTFT/TPOT vs HF transformers generate")
    _engine_args(lat)
    lat.add_argument("--input-len", type=int, nargs="+", default=[128])
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--milestone", default=None)
    lat.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    lat.add_argument("--repeats", type=int, default=1, help="timed runs per engine; medians reported")
    lat.add_argument("--out", default=None)

    thr = bench.add_parser("throughput", help="the nano-vllm workload under several engine configs")
    _engine_args(thr)
    thr.add_argument("--num-prompts", type=int, default=256)
    thr.add_argument("--input-len", default="100:1024")
    thr.add_argument("--output-len", default="100:1024")
    thr.add_argument("--seed", type=int, default=0)
    thr.add_argument("--subset", type=int, default=None, help="keep only the first N prompts of the workload")
    thr.add_argument("--repeat", type=int, default=1, help="runs per config (median and spread reported)")
    thr.add_argument(
        "--milestone",
        nargs="+",
        default=["M2"],
        help="configs to compare, e.g. M2/sequential@32 M2/static M2 M3 (@N: first N prompts)",
    )
    thr.add_argument("--out", default=None)

    att = bench.add_parser("attention", help="paged decode kernel: achieved bandwidth")
    att.add_argument("--device", default=None)
    att.add_argument("--dtype", default="bfloat16")
    att.add_argument("--num-seqs", type=int, nargs="+", default=[1, 16, 64, 256])
    att.add_argument("--context-len", type=int, nargs="+", default=[512, 2048, 8192])
    att.add_argument("--num-heads", type=int, default=16)
    att.add_argument("--num-kv-heads", type=int, default=8)
    att.add_argument("--head-dim", type=int, default=128)
    att.add_argument("--block-size", type=int, default=16)
    att.add_argument("--out", default=None)

    stp = bench.add_parser("step", help="one decode step profiled: host vs GPU time, launches, timeline")
    _engine_args(stp)
    stp.add_argument("--milestone", nargs="+", default=["M3", "M4"])
    stp.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 256])
    stp.add_argument("--prompt-len", type=int, default=128)
    stp.add_argument("--steps", type=int, default=20)
    stp.add_argument("--no-timeline", action="store_true", help="keep kernel counts and top kernels, not every event")
    stp.add_argument(
        "--prefill",
        action="store_true",
        help="profile the step prefilling batch-size fresh prompts, all in one step (steps = timed runs)",
    )
    stp.add_argument("--out", default=None)

    pfx = bench.add_parser("prefix", help="prefix caching: TTFT hit vs miss, shared system prompt, multi-turn chat")
    _engine_args(pfx)
    pfx.add_argument(
        "--milestone",
        nargs="+",
        default=["M4", "M6"],
        help="configs, the one with prefix caching last (summary ratios: last over first)",
    )
    pfx.add_argument("--parts", nargs="+", default=["ttft", "throughput", "chat"], choices=["ttft", "throughput", "chat"])
    pfx.add_argument("--prefix-len", type=int, default=4096, help="ttft: shared prefix tokens")
    pfx.add_argument("--suffix-len", type=int, default=128, help="ttft: tokens after the prefix")
    pfx.add_argument("--repeat", type=int, default=3, help="ttft: miss/hit pairs (median reported)")
    pfx.add_argument("--num-prompts", type=int, default=256, help="throughput: requests")
    pfx.add_argument("--system-len", type=int, default=2048, help="throughput: shared system prompt tokens")
    pfx.add_argument("--user-len", default="32:128", help="throughput: each request's own tokens, LO:HI")
    pfx.add_argument("--output-len", type=int, default=128, help="throughput: output tokens per request")
    pfx.add_argument("--conversations", type=int, default=16, help="chat: conversations")
    pfx.add_argument("--turns", type=int, default=6, help="chat: turns per conversation")
    pfx.add_argument("--chat-system-len", type=int, default=512)
    pfx.add_argument("--turn-len", type=int, default=64, help="chat: user tokens per turn")
    pfx.add_argument("--reply-len", type=int, default=64, help="chat: generated tokens per turn")
    pfx.add_argument("--seed", type=int, default=0)
    pfx.add_argument("--out", default=None)

    gq = bench.add_parser("gptq", help="W4A16 kernel vs bf16 matmul, weight memory, TPOT bf16 vs GPTQ (GPU)")
    gq.add_argument("--model", default="random:qwen3-8b")
    gq.add_argument("--device", default=None)
    gq.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 256, 4096], help="rows of X")
    gq.add_argument("--input-len", type=int, default=128)
    gq.add_argument("--output-len", type=int, default=128)
    gq.add_argument("--kernels-only", action="store_true", help="skip the whole-model memory and TPOT runs")
    gq.add_argument("--sweep", action="store_true", help="also time every launch plan at M = 1, 4, 16, 64, 256, 4096")
    gq.add_argument(
        "--sweep-m", type=int, nargs="+", default=None, help="sweep these M only; the tuned table keeps its other plans"
    )
    gq.add_argument(
        "--lm-head", action="store_true", help="only lm_head's shape (4096 x 151936) in the kernel table and sweep"
    )
    gq.add_argument("--out", default=None)

    gmm = bench.add_parser("gemm", help="decode projections: cuBLAS vs the skinny GEMM; --sweep tunes it (GPU)")
    gmm.add_argument("--model", default="random:qwen3-0.6b")
    gmm.add_argument("--m", type=int, nargs="+", default=[1, 2, 4], help="rows of x")
    gmm.add_argument("--device", default=None)
    gmm.add_argument("--sweep", action="store_true", help="time every plan, write the tuned table, measure TPOT")
    gmm.add_argument("--tpot", action="store_true", help="batch-1 TPOT: cuBLAS, tuned, tuned with fused prologues")
    gmm.add_argument("--out", default=None)

    pre = bench.add_parser("prefill", help="prefill attention per backend: time, TFLOP/s, memory")
    pre.add_argument("--device", default=None)
    pre.add_argument("--dtype", default="bfloat16")
    pre.add_argument("--prompt-len", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    pre.add_argument("--num-prompts", type=int, default=1)
    pre.add_argument("--num-heads", type=int, default=16)
    pre.add_argument("--num-kv-heads", type=int, default=8)
    pre.add_argument("--head-dim", type=int, default=128)
    pre.add_argument("--block-size", type=int, default=16)
    pre.add_argument(
        "--backend", nargs="+", default=["naive", "triton", "flash_attn"], choices=["naive", "triton", "flash_attn"]
    )
    pre.add_argument(
        "--context-len",
        type=int,
        nargs="+",
        default=None,
        help="chunked prefill (M5): each --prompt-len is a chunk after this many cached tokens; paged kernel vs FA2",
    )
    pre.add_argument("--num-decodes", type=int, nargs="+", default=[0], help="with --context-len: decode rows beside")
    pre.add_argument("--num-splits", type=int, nargs="+", default=None, help="with --context-len: split-K counts to time")
    pre.add_argument("--out", default=None)

    ser = bench.add_parser(
        "serve", help="requests arriving over time: TTFT/TPOT/ITL/E2EL percentiles, in-process or over HTTP"
    )
    _engine_args(ser)
    ser.add_argument(
        "--workload",
        default="random",
        choices=["random", "mixed", "phased"],
        help="random: W-like; mixed: W-like with long prompts mixed in; phased: W, then mixed (a load that changes)",
    )
    ser.add_argument("--num-prompts", type=int, default=256)
    ser.add_argument("--input-len", default="100:1024")
    ser.add_argument("--output-len", default="100:1024")
    ser.add_argument("--long-input-len", default="4096:8192", help="mixed/phased: prompt lengths of the long requests")
    ser.add_argument("--long-fraction", type=float, default=0.1, help="share of long prompts (phased: of its second half)")
    ser.add_argument("--seed", type=int, default=0)
    ser.add_argument("--vocab-size", type=int, default=10000, help="prompt token ids are drawn from [0, N]")
    ser.add_argument("--subset", type=int, default=None, help="keep only the first N requests of the workload")
    ser.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="Poisson arrivals per second (default inf: all at once); several: one row per (config, rate)",
    )
    ser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    ser.add_argument(
        "--collect-step-stats",
        action="store_true",
        default=None,
        help="in-process: summarize the engine's own steps per row (decode-only vs with prompt tokens)",
    )
    ser.add_argument(
        "--milestone",
        nargs="+",
        default=[BUILT_MILESTONES[-1]],
        help="in-process engine configs, as bench throughput takes them (e.g. M4 M3/naive)",
    )
    ser.add_argument(
        "--base-url",
        default=None,
        help="benchmark a running `folovllm serve` at this URL instead (e.g. http://127.0.0.1:8000)",
    )
    ser.add_argument("--save-detailed", action="store_true", help="keep every inter-token gap of every request")
    ser.add_argument("--baseline", default=None, help="an earlier results file to include and compare with")
    ser.add_argument("--out", default=None)
    return parser


def _serve(args: argparse.Namespace) -> None:
    from folovllm.engine.async_llm import AsyncLLM
    from folovllm.entrypoints.openai.api_server import run_server

    engine = AsyncLLM.from_milestone(args.model, args.milestone, device=args.device, dtype=args.dtype, **_overrides(args))
    run_server(engine, args.host, args.port, args.served_model_name or args.model, args.log_level)


def _generate(args: argparse.Namespace) -> None:
    from folovllm.entrypoints.llm import LLM
    from folovllm.sampling_params import SamplingParams

    llm = LLM(args.model, milestone=args.milestone, device=args.device, dtype=args.dtype, **_overrides(args))
    prompt = args.prompt
    tok = llm.get_tokenizer()
    if args.chat:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("--chat needs a model whose tokenizer has a chat template")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    engine = llm.llm_engine
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "quantize":
            from folovllm.quantization.quantize import quantize_model

            write_results(
                None,
                quantize_model(
                    args.model,
                    args.out,
                    args.method,
                    args.bits,
                    args.group_size,
                    args.desc_act,
                    args.sym,
                    args.calib_samples,
                    args.calib_seq_len,
                    args.damp_percent,
                    args.seed,
                    args.device,
                    lm_head=args.lm_head,
                ),
            )
        elif args.command == "eval":
            from folovllm.quantization.perplexity import evaluate_perplexity

            write_results(
                args.out,
                evaluate_perplexity(args.model, args.max_tokens, args.seq_len, args.device, args.dtype, args.quantization),
            )
        elif args.bench == "serve":
            from folovllm.benchmarks.serve import bench_serve

            write_results(
                None,
                bench_serve(
                    args.model,
                    args.milestone,
                    args.workload,
                    args.num_prompts,
                    parse_range(args.input_len),
                    parse_range(args.output_len),
                    parse_range(args.long_input_len),
                    args.long_fraction,
                    args.seed,
                    args.vocab_size,
                    args.subset,
                    args.request_rate,
                    args.max_concurrency,
                    args.base_url,
                    args.save_detailed,
                    args.baseline,
                    device=args.device,
                    dtype=args.dtype,
                    out=args.out,
                    **_overrides(args),
                ),
            )
        elif args.bench == "latency":
            from folovllm.benchmarks.latency import bench_latency

            write_results(
                args.out,
                bench_latency(
                    args.model,
                    args.input_len,
                    args.output_len,
                    args.batch_size,
                    device=args.device,
                    dtype=args.dtype,
                    milestone=args.milestone,
                    with_hf=not args.no_hf,
                    repeats=args.repeats,
                    **_overrides(args),
                ),
            )
        elif args.bench == "throughput":
            from folovllm.benchmarks.throughput import bench_throughput

            write_results(
                args.out,
                bench_throughput(
                    args.model,
                    args.milestone,
                    args.num_prompts,
                    parse_range(args.input_len),
                    parse_range(args.output_len),
                    args.seed,
                    args.subset,
                    device=args.device,
                    dtype=args.dtype,
                    out=args.out,
                    repeat=args.repeat,
                    **_overrides(args),
                ),
            )
        elif args.bench == "step":
            from folovllm.benchmarks.step_profile import bench_step

            write_results(
                args.out,
                bench_step(
                    args.model,
                    args.milestone,
                    args.batch_size,
                    args.prompt_len,
                    args.steps,
                    device=args.device,
                    dtype=args.dtype,
                    timeline=not args.no_timeline,
                    prefill=args.prefill,
                    **_overrides(args),
                ),
            )
        elif args.bench == "prefix":
            from folovllm.benchmarks.prefix import bench_prefix

            write_results(
                args.out,
                bench_prefix(
                    args.model,
                    args.milestone,
                    tuple(args.parts),
                    args.prefix_len,
                    args.suffix_len,
                    args.repeat,
                    args.num_prompts,
                    args.system_len,
                    parse_range(args.user_len),
                    args.output_len,
                    args.conversations,
                    args.turns,
                    args.chat_system_len,
                    args.turn_len,
                    args.reply_len,
                    args.seed,
                    device=args.device,
                    dtype=args.dtype,
                    out=args.out,
                    **_overrides(args),
                ),
            )
        elif args.bench == "gptq":
            from folovllm.benchmarks.gptq import bench_gptq

            write_results(
                args.out,
                bench_gptq(
                    args.m,
                    args.model,
                    args.input_len,
                    args.output_len,
                    args.device,
                    skip_model=args.kernels_only,
                    sweep=args.sweep or args.sweep_m is not None,
                    sweep_ms=args.sweep_m,
                    lm_head=args.lm_head,
                ),
            )
        elif args.bench == "gemm":
            from folovllm.benchmarks.gemm import bench_gemm

            write_results(args.out, bench_gemm(args.model, args.m, args.device, args.sweep, tpot=args.tpot))
        elif args.bench == "prefill" and args.context_len is not None:
            from folovllm.benchmarks.attention import bench_chunk_attention

            write_results(
                args.out,
                bench_chunk_attention(
                    args.prompt_len, args.context_len, args.num_decodes, args.num_heads, args.num_kv_heads,
                    args.head_dim, args.block_size, args.dtype, args.device, args.num_splits,
                ),
            )  # fmt: skip
        elif args.bench == "prefill":
            from folovllm.benchmarks.attention import bench_prefill_attention

            write_results(
                args.out,
                bench_prefill_attention(
                    args.prompt_len,
                    args.num_prompts,
                    args.num_heads,
                    args.num_kv_heads,
                    args.head_dim,
                    args.block_size,
                    args.dtype,
                    args.device,
                    tuple(args.backend),
                ),
            )
        else:
            from folovllm.benchmarks.attention import bench_attention_sweep

            write_results(
                args.out,
                bench_attention_sweep(
                    args.num_seqs,
                    args.context_len,
                    args.num_heads,
                    args.num_kv_heads,
                    args.head_dim,
                    args.block_size,
                    args.dtype,
                    args.device,
                ),
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
