"""The command line and the benchmarks, on tiny CPU models (fields and invariants, not speed)."""

from __future__ import annotations

import json

import pytest

from folovllm.benchmarks.common import parse_config, parse_range, random_workload
from folovllm.cli import build_parser, main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate" in out and "bench" in out


def test_generate_streams_text(tiny_checkpoint, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint("llama")),
            "--prompt",
            "w5 w6 w7",
            "--max-tokens",
            "6",
            "--max-model-len",
            "64",
            "--kv-cache-memory",
            str(2**20),
        ]
    )
    assert rc == 0
    assert len(capsys.readouterr().out.split()) == 6  # the tiny tokenizer decodes one word per token


def test_generate_reports_bad_input_as_an_error(tiny_checkpoint, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint("llama")),
            "--prompt",
            "w5",
            "--top-p",
            "0",
            "--max-model-len",
            "64",
            "--kv-cache-memory",
            str(2**20),
        ]
    )
    assert rc == 2
    assert "top_p must be a finite number in (0, 1], got 0.0" in capsys.readouterr().err
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint("llama")),
            "--prompt",
            "w5",
            "--chat",
            "--max-model-len",
            "64",
            "--kv-cache-memory",
            str(2**20),
        ]
    )
    assert rc == 2
    assert "--chat needs a model whose tokenizer has a chat template" in capsys.readouterr().err


def test_workload_matches_nano_vllm_and_ranges_parse():
    prompts, outputs = random_workload()
    assert (len(prompts), sum(outputs)) == (256, 133_966)
    assert parse_range("100:1024") == (100, 1024) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError, match="expected N or LO:HI"):
        parse_range("a:b")
    assert parse_config("M2/sequential@8") == ("M2", {"batching": "sequential"}, 8)
    assert parse_config("M3/naive") == ("M3", {"attention_backend": "naive"}, None)
    assert parse_config("M4/sync/eager") == ("M4", {"async_scheduling": False, "enforce_eager": True}, None)
    assert parse_config("M3/block=32@4") == ("M3", {"block_size": 32}, 4)
    assert parse_config("M7/gptq") == ("M7", {"quantization": "gptq"}, None)
    assert parse_config("M7/gptq/lm-head")[1]["hf_overrides"]["quantization_config"]["lm_head"] is True
    assert parse_config("M4/compile") == ("M4", {"compilation_config": 3, "fuse_kernels": False}, None)
    assert parse_config("M5/decode-graphs") == ("M5", {"cudagraph_mode": "FULL_DECODE_ONLY"}, None)
    with pytest.raises(ValueError, match="unknown config variant 'fast'"):
        parse_config("M3/fast")
    assert parse_config("M5/budget=512/threshold=256/itl=20") == (
        "M5",
        {"max_num_batched_tokens": 512, "long_prefill_token_threshold": 256, "target_itl_ms": 20.0},
        None,
    )
    with pytest.raises(ValueError, match="config variant budget= needs a number, got 'x'"):
        parse_config("M5/budget=x")


def test_bench_throughput_json(tmp_path, capsys):
    out = tmp_path / "thr.json"
    rc = main(
        [
            "bench",
            "throughput",
            "--model",
            "random:tiny-llama",
            "--device",
            "cpu",
            "--num-prompts",
            "6",
            "--input-len",
            "8:16",
            "--output-len",
            "20:30",
            "--milestone",
            "M2/sequential@3",
            "M2",
            "M3",
            "--max-model-len",
            "64",
            "--kv-cache-memory",
            str(2**20),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "throughput" and data["workload"]["num_prompts"] == 6
    rows = {r["config"]: r for r in data["results"]}
    assert rows["M2/sequential@3"]["max_concurrent_seqs"] == 1 and rows["M2/sequential@3"]["num_prompts"] == 3
    assert rows["M2"]["output_tokens"] == sum(random_workload(6, (8, 16), (20, 30))[1])
    assert rows["M3"]["kv_layout"] == "paged" and rows["M3"]["kv_utilization_mean"] > rows["M2"]["kv_utilization_mean"]
    assert all(0 < r["fraction_of_floor"] and r["floor"]["floor_s"] > 0 for r in data["results"])
    for key in ("command", "commit", "date", "gpu", "torch", "triton", "transformers", "model", "dtype"):
        assert key in data
    capsys.readouterr()


def test_bench_latency_json(tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(
        [
            "bench",
            "latency",
            "--model",
            "random:tiny-qwen3",
            "--device",
            "cpu",
            "--input-len",
            "8",
            "16",
            "--output-len",
            "4",
            "--batch-size",
            "2",
            "--repeats",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["input_len"] for r in data["results"]] == [8, 16]
    for row in data["results"]:
        ours, hf = row["folovllm"], row["hf_transformers"]
        assert ours["ttft_s"] > 0 and hf["tpot_s"] > 0
        assert len(ours["ttft_s_runs"]) == len(ours["tpot_s_runs"]) == len(hf["ttft_s_runs"]) == 3
        assert ours["ttft_s"] == sorted(ours["ttft_s_runs"])[1] and hf["ttft_s"] == sorted(hf["ttft_s_runs"])[1]
    assert data["decode_floor_s"] > 0
    capsys.readouterr()


def test_bench_attention_json(tmp_path, capsys):
    out = tmp_path / "att.json"
    rc = main(
        [
            "bench",
            "attention",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--num-seqs",
            "2",
            "--context-len",
            "20",
            "--num-heads",
            "4",
            "--num-kv-heads",
            "2",
            "--head-dim",
            "32",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["max_abs_diff"] < 1e-4 and row["kv_bytes_read"] == 2 * 2 * 20 * 2 * 32 * 4
    capsys.readouterr()


def test_bench_prefill_chunks_json(tmp_path, capsys):
    """M5's chunk shapes: the paged kernel equals the reference over the cached context plus the chunk, beside
    decode rows; the grid is the token-count one (FA2 is skipped on CPU, with the reason)."""
    out = tmp_path / "chunks.json"
    argv = "bench prefill --device cpu --dtype float32 --prompt-len 40 --context-len 0 24 --num-decodes 0 3"
    argv += " --num-heads 4 --num-kv-heads 2 --head-dim 16 --block-size 8 --num-splits 1 3 --out " + str(out)
    assert main(argv.split()) == 0
    rows = json.loads(out.read_text())["results"]
    for r in rows:  # forced split-K gives the planned output (one split on CPU) up to rounding
        assert r["triton"]["num_splits"] == 1 and sorted(r["by_splits"]) == ["1", "3"]
        assert r["by_splits"]["1"]["max_abs_diff_vs_planned"] == 0 and r["by_splits"]["3"]["max_abs_diff_vs_planned"] < 1e-5
    assert [(r["context_len"], r["num_decodes"]) for r in rows] == [(0, 0), (0, 3), (24, 0), (24, 3)]
    for r in rows:
        assert r["triton"]["max_abs_diff"] < 1e-4 and "CUDA" in r["flash_attn"]["skipped"]
        assert r["flops"] == 4 * 4 * 16 * (40 * r["context_len"] + 40 * 41 // 2)
    q_tile = 64 // 2  # BLOCK_M rows of a prefill tile over a GQA group of 2
    assert rows[1]["triton"]["grid"][0] == 43 // q_tile + 4 and rows[1]["triton"]["programs_before_m5"] == 4 * 2
    capsys.readouterr()
    assert main("bench prefill --device cpu --prompt-len 8 --context-len -1".split()) != 0
    assert "context_len must be integers >= 0, got [-1]" in capsys.readouterr().err
    assert main("bench prefill --device cpu --prompt-len 8 --context-len 0 --num-splits 0".split()) != 0
    assert "num_splits must be integers in [1, 16], got [0]" in capsys.readouterr().err


def test_parser_rejects_unknown_bench():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "nothing"])


def test_bench_step_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = main(
        [
            "bench",
            "step",
            "--model",
            "random:tiny-llama",
            "--device",
            "cpu",
            "--milestone",
            "M3",
            "M4",
            "--batch-size",
            "1",
            "3",
            "--prompt-len",
            "8",
            "--steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["milestone"], r["batch_size"]) for r in data["results"]] == [("M3", 1), ("M3", 3), ("M4", 1), ("M4", 3)]
    for row in data["results"]:
        assert row["wall_ms_per_step"] > 0 and row["host_ms_per_step"] > 0
        assert not row["cuda_graphs"] and row["num_gpu_kernels"] == 0  # CPU: eager, no GPU
    assert data["floor"]["weights_floor_ms"] > 0
    capsys.readouterr()


def test_bench_step_floor_is_each_configs_own(tmp_path, capsys):
    """A GPTQ config reads about a quarter of the projections' bytes, so its row's floor and ratio use its own
    weight bytes, not the first config's."""
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", "random:tiny-llama", "--device", "cpu", "--milestone", "M4", "M7/gptq"]
    assert main([*argv, "--batch-size", "1", "--prompt-len", "8", "--steps", "2", "--no-timeline", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    bf16, gptq = data["results"]
    assert gptq["weight_bytes"] < bf16["weight_bytes"] == data["floor"]["weight_bytes"]
    for row in (bf16, gptq):
        assert row["wall_vs_weights_floor"] == pytest.approx(row["wall_ms_per_step"] / row["weights_floor_ms"])
        assert row["weights_floor_ms"] == pytest.approx(row["weight_bytes"] / (data["floor"]["copy_GBps"] * 1e6))
    capsys.readouterr()


def test_bench_step_block_sizes_without_timeline(tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", "random:tiny-llama", "--device", "cpu", "--milestone", "M3/block=4", "M3/block=32"]
    rc = main([*argv, "--batch-size", "2", "--prompt-len", "40", "--steps", "3", "--no-timeline", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["milestone"], r["block_size"]) for r in rows] == [("M3/block=4", 4), ("M3/block=32", 32)]
    assert all("timeline" not in r and r["wall_ms_per_step"] > 0 for r in rows)
    capsys.readouterr()


def test_bench_step_prefill_profiles_the_prefill_step(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    argv = ["bench", "step", "--model", "random:tiny-llama", "--device", "cpu", "--milestone", "M3", "M4", "--prefill"]
    rc = main([*argv, "--batch-size", "2", "--prompt-len", "24", "--steps", "3", "--no-timeline", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "prefill_step" and set(data["wall_ms"]) == {"M3@2", "M4@2"}
    for row in data["results"]:
        assert (row["batch_size"], row["prompt_len"], len(row["wall_ms_runs"])) == (2, 24, 3)
        assert row["wall_ms"] == sorted(row["wall_ms_runs"])[1] and row["profiled_wall_ms"] > 0
    capsys.readouterr()


def test_bench_prefix_json(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    rc = main(
        [
            "bench",
            "prefix",
            "--model",
            "random:tiny-llama",
            "--device",
            "cpu",
            "--block-size",
            "4",
            "--milestone",
            "M4",
            "M6",
            "--prefix-len",
            "30",
            "--suffix-len",
            "5",
            "--repeat",
            "1",
            "--num-prompts",
            "6",
            "--system-len",
            "20",
            "--user-len",
            "3:6",
            "--output-len",
            "3",
            "--conversations",
            "2",
            "--turns",
            "3",
            "--chat-system-len",
            "8",
            "--turn-len",
            "4",
            "--reply-len",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "prefix" and data["commit"] and data["model"] == "random:tiny-llama"
    m4, m6 = data["results"]
    assert (m4["prefix_caching"], m6["prefix_caching"]) == (False, True)
    assert m4["ttft"]["runs"][0]["hit_num_cached_tokens"] == 0
    assert m6["ttft"]["runs"][0]["hit_num_cached_tokens"] == 28  # 7 full blocks of the 30-token prefix
    profile = m6["ttft"]["hit_profile"]  # the profiled hit: one step, its host and forward time, no GPU kernels
    assert profile["steps"] == 1 and profile["host_ms"] > 0 and profile["num_gpu_kernels"] == 0
    assert profile["host_launch_ms"] == 0 and profile["profiled_wall_ms"] > 0
    assert m4["throughput"]["cached_tokens"] == 0 and m6["throughput"]["cached_tokens"] == 5 * 20
    # Turn 1 hits the 8-token system prompt for the second conversation only; later turns hit the
    # conversation so far (each prompt of turn t+1 extends the prompt and answer of turn t).
    assert [r["hit_rate"] for r in m4["chat"]] == [0.0] * 3
    assert m6["chat"][0]["cached_tokens"] == 8 and all(r["hit_rate"] > 0.5 for r in m6["chat"][1:])
    assert data["summary"]["kv_blocks_saved_at_peak"] > 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "prefix", "--parts", "nothing"])


def test_bench_latency_times_a_full_prefill_with_prefix_caching():
    """With M6's prefix cache the warm-up's blocks would turn the timed prompt into a hit (on the H200 the
    GPTQ TPOT run timed a 5.3 s TTFT: a compile for a prefill shape the warm-up never ran)."""
    from folovllm.benchmarks.latency import bench_latency

    data = bench_latency("random:tiny-llama", [40], 4, device="cpu", milestone="M6", with_hf=False, block_size=4)
    assert data["results"][0]["folovllm"]["num_cached_tokens"] == 0


def test_hf_continuous_batching_baseline_runs_our_workload():
    """The HF row of bench throughput: HF's own continuous batching on our weights gives our greedy tokens
    (fp32, CPU) for every request, each with its own output length, and counts the workload's tokens."""
    from folovllm import LLM, SamplingParams
    from folovllm.benchmarks.common import random_workload
    from folovllm.benchmarks.latency import _hf_model
    from folovllm.benchmarks.throughput import bench_throughput, hf_continuous_batching

    llm = LLM("random:tiny-qwen3", milestone="M1", device="cpu", dtype="float32", max_model_len=128)
    prompts = [[(7 * i + 3 * j) % 400 + 3 for j in range(5 + 3 * i)] for i in range(3)]
    outputs = [6, 3, 9]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outputs]
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    _, theirs = hf_continuous_batching(_hf_model(llm), prompts, outputs, llm.llm_engine.vocab_size)
    assert theirs == ours and [len(t) for t in theirs] == outputs
    run = bench_throughput("random:tiny-qwen3", ["M2", "HF@2"], num_prompts=3, input_len=(5, 9), output_len=(3, 5),
                           device="cpu", dtype="float32", max_model_len=64)  # fmt: skip
    m2, hf = run["results"]
    assert hf["milestone"] == "HF" and hf["num_prompts"] == 2 and m2["num_prompts"] == 3
    _, wanted = random_workload(3, (5, 9), (3, 5), 0)
    assert hf["output_tokens"] == sum(wanted[:2]) and m2["output_tokens"] == sum(wanted) == run["workload"]["output_tokens"]


def test_bench_gptq_sweep_of_some_m_needs_a_gpu(capsys, monkeypatch):
    """``--sweep-m`` reaches ``bench_gptq`` as a sweep of those M, ``--lm-head`` as lm_head's shape alone (here
    stopped by the CPU, before any work)."""
    from folovllm.benchmarks import gptq

    seen = {}
    real = gptq.bench_gptq
    monkeypatch.setattr(gptq, "bench_gptq", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(["bench", "gptq", "--device", "cpu", "--m", "1", "--sweep-m", "1"]) == 2
    assert seen == {"skip_model": False, "sweep": True, "sweep_ms": [1], "lm_head": False}
    assert "bench gptq times the Triton kernel against cuBLAS and needs a CUDA device, got cpu" in capsys.readouterr().err
    assert main(["bench", "gptq", "--device", "cpu", "--m", "1", "--sweep-m", "1", "--lm-head"]) == 2
    assert seen["lm_head"] is True


def test_generate_takes_hf_overrides_as_a_json_object(tiny_checkpoint, capsys):
    """``--hf-overrides`` (vLLM's flag) reaches the HF config before the model is built: a context window cut to
    16 positions caps the engine's ``max_model_len``; a value that is not a JSON object is refused by argparse."""
    args = ["generate", "--model", str(tiny_checkpoint("llama")), "--prompt", "w5 " * 20, "--max-tokens", "2",
            "--kv-cache-memory", str(2**20), "--hf-overrides", '{"max_position_embeddings": 16}']  # fmt: skip
    assert main(args) == 2
    assert "prompt has 20 tokens; max_model_len is 16, which leaves no room to generate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-1] + ["[1, 2]"])
    assert "--hf-overrides: expected a JSON object, got [1, 2]" in capsys.readouterr().err
