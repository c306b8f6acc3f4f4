"""``folovllm serve``: a real uvicorn server on a free localhost port, driven by the official ``openai``
client and by raw HTTP. Outputs equal the offline engine's; every bad input is a 400 in OpenAI's format;
a load of concurrent streams loses nothing; a client that hangs up frees its blocks; SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest

from folovllm import LLM, SamplingParams
from folovllm.engine.async_llm import AsyncLLM
from folovllm.entrypoints.openai.api_server import ServerThread

TINY = {"max_model_len": 256, "kv_cache_memory": 2**21, "device": "cpu"}
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """A tiny Llama with a word-level tokenizer ("w5 w6 ..."), no chat template; served as ``tiny``."""
    folder = str(tiny_checkpoint("llama"))
    engine = AsyncLLM.from_milestone(folder, **TINY)
    with ServerThread(engine, served_model_name="tiny") as server:
        yield server, engine, folder
    engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def smol():
    engine = AsyncLLM.from_milestone("smollm2-135m", max_model_len=512, kv_cache_memory=2**24, device="cpu")
    with ServerThread(engine, served_model_name="smol") as server:
        yield server, engine
    engine.shutdown(drain=False)


def _client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _blocks_in_use(engine: AsyncLLM) -> int:
    pool = engine.engine.kv_cache_manager
    return pool.num_blocks - pool.block_pool.num_free_blocks


def test_models_health_and_completion_equal_the_offline_engine(tiny):
    server, engine, folder = tiny
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx2.get(f"{server.url}/health").status_code == 200
    prompt = "w5 w6 w7 w8"
    expected = LLM(folder, **TINY).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0]
    out = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = out.choices[0]
    assert (choice.text, choice.token_ids) == (expected.outputs[0].text, expected.outputs[0].token_ids)
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (4, 12, 16)
    streamed = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(streamed)  # a reader slower than the engine gets several tokens in one chunk
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_token_prompts_several_prompts_n_seed_stop_and_logprobs(tiny):
    server, _, _ = tiny
    client = _client(server)
    ids = [[5, 6, 7], [9, 10, 11, 12]]
    kw = {"model": "tiny", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2, "extra_body": {"ignore_eos": True}}
    first, again = (client.completions.create(prompt=ids, **kw) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert first.usage.prompt_tokens == 7 and first.usage.completion_tokens == 24
    greedy = client.completions.create(
        model="tiny",
        prompt=ids[0],
        max_tokens=8,
        temperature=0.0,
        logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    words = greedy.text.split()
    lp = greedy.logprobs
    assert len(lp.tokens) == 8 and len(lp.top_logprobs) == 8 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(8))  # greedy: top-1
    stopped = client.completions.create(model="tiny", prompt=ids[0], max_tokens=8, temperature=0.0, stop=[words[3]]).choices[
        0
    ]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", words[3])
    assert stopped.text.split() == words[:3]
    by_id = client.completions.create(
        model="tiny", prompt=ids[0], max_tokens=8, temperature=0.0, extra_body={"stop_token_ids": [greedy.token_ids[1]]}
    ).choices[0]
    assert (by_id.finish_reason, by_id.stop_reason, by_id.text.split()) == ("stop", greedy.token_ids[1], words[:2])
    extras = client.completions.create(
        model="tiny", prompt=ids[0], max_tokens=8, temperature=0.7, extra_body={"top_k": 1, "min_p": 0.1, "ignore_eos": True}
    ).choices[0]
    assert extras.text == greedy.text  # top_k=1 is greedy


def test_chat_with_the_models_template_streaming_and_logprobs(smol):
    server, engine = smol
    client = _client(server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(
        model="smol", messages=messages, max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=2
    )
    template_ids = engine.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert out.usage.prompt_tokens == len(template_ids)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert len(choice.logprobs.content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(
        client.chat.completions.create(model="smol", messages=messages, max_tokens=10, temperature=0.0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert (
        client.chat.completions.create(model="smol", messages=parts, max_tokens=10, temperature=0.0)
        .choices[0]
        .message.content
        == choice.message.content
    )


def test_concurrent_streams_each_get_their_own_tokens(smol):
    server, _ = smol
    prompts = ["The capital of France is", "One, two, three,", "def fibonacci(n):", "Once upon a time"]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def stream(p: str) -> str:
            chunks = await client.completions.create(model="smol", prompt=p, max_tokens=8, temperature=0.0, stream=True)
            return "".join([c.choices[0].text async for c in chunks])

        together = await asyncio.gather(*[stream(p) for p in prompts])
        alone = [
            (await client.completions.create(model="smol", prompt=p, max_tokens=8, temperature=0.0)).choices[0].text
            for p in prompts
        ]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone


def test_chat_is_refused_without_a_template(tiny):
    server, _, _ = tiny
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}])
    assert err.value.body == {
        "message": "model `tiny` has no chat template; use /v1/completions with a plain prompt",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "w5"', 400, None, "request body is not valid JSON"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "w5", "max_tokens": -1},
        400,
        "max_tokens",
        "max_tokens must be an integer in [1, 2**63 - 1] or None, got -1",
    ),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "many"}, 400, "max_tokens", "max_tokens: Input should be"),
    (
        "/v1/completions",
        {"prompt": "w5", "temperature": -0.5},
        400,
        "temperature",
        "temperature must be a finite number in [0, 3.40282e+38], got -0.5",
    ),
    ("/v1/completions", {"prompt": "w5", "top_p": 0}, 400, "top_p", "top_p must be a finite number in (0, 1], got 0.0"),
    ("/v1/completions", {"prompt": "w5", "top_p": 1.5}, 400, "top_p", "top_p must be a finite number in (0, 1], got 1.5"),
    ("/v1/completions", {"prompt": "w5", "n": 0}, 400, "n", "n must be an integer in [1, 128], got 0"),
    ("/v1/completions", {"prompt": " ".join(["w5"] * 300)}, 400, "prompt", "prompt has 300 tokens; max_model_len is 256"),
    (
        "/v1/completions",
        {"prompt": "w5 w6", "max_tokens": 255},
        400,
        "prompt",
        "prompt (2 tokens) + max_tokens (255) exceeds max_model_len (256)",
    ),
    (
        "/v1/completions",
        {"prompt": [[5, 6], [99999]]},
        400,
        "prompt",
        "prompt_token_ids[0] is 99999, outside the vocabulary",
    ),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "prompt must not be empty"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "prompt: Field required"),
    (
        "/v1/completions",
        {"prompt": "w5", "frequency_penalty": 1},
        400,
        "frequency_penalty",
        "Unrecognized request argument supplied: frequency_penalty",
    ),
    (
        "/v1/completions",
        {"prompt": "w5", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "stream_options is only allowed when stream is true",
    ),
    ("/v1/completions", {"model": "gpt-4", "prompt": "w5"}, 404, "model", "The model `gpt-4` does not exist"),
    ("/v1/completions", [1, 2], 400, None, "request body: Input should be a valid dictionary"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "messages: Input should be a valid list"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "messages.0.role: Field required"),
    (
        "/v1/chat/completions",
        {"messages": [], "top_logprobs": 3},
        400,
        "top_logprobs",
        "top_logprobs needs logprobs set to true",
    ),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD_REQUESTS)
def test_bad_input_is_an_openai_error(tiny, path, body, status, param, message):
    server, engine, _ = tiny
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx2.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(message)
    assert not engine.engine.has_unfinished_requests()


def test_load_of_concurrent_streams_loses_nothing(tiny):
    """64 streaming clients, 256 requests: each finishes once with exactly its tokens; every block returns."""
    server, engine, _ = tiny
    rng = random.Random(0)
    jobs = [([rng.randint(3, 500) for _ in range(rng.randint(1, 40))], rng.randint(1, 24)) for _ in range(256)]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        limit = asyncio.Semaphore(64)

        async def one(prompt: list[int], max_tokens: int):
            async with limit:
                stream = await client.completions.create(
                    model="tiny",
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=1.0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                chunks = [c async for c in stream]
            tokens = [t for c in chunks for ch in c.choices for t in ch.token_ids]
            finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
            return len(tokens), finishes, chunks[-1].usage.completion_tokens

        return await asyncio.gather(*[one(p, m) for p, m in jobs])

    results = asyncio.run(main())
    assert results == [(m, ["length"], m) for _, m in jobs]
    _wait_until(lambda: not engine.engine.has_unfinished_requests())  # async scheduling: one step in flight
    assert _blocks_in_use(engine) == 0
    metrics = httpx2.get(f"{server.url}/metrics").text
    assert "folovllm:num_requests_running 0.0" in metrics and "folovllm:kv_cache_usage_perc 0.0" in metrics
    assert 'folovllm:request_success_total{finished_reason="length"}' in metrics
    count = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("folovllm:time_to_first_token_seconds_count")
        )
    )
    assert count >= len(jobs)


def _wait_until(predicate, timeout: float = 5.0) -> float:
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout, "timed out"
        time.sleep(0.005)
    return time.perf_counter() - start


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_blocks(tiny, stream):
    """The engine is slowed to 10 ms a step, so the 200-token request would run 2 s: it is gone far sooner."""
    server, engine, _ = tiny
    real_step = engine.engine.step
    engine.engine.step = lambda: (time.sleep(0.01), real_step())[1]
    try:
        body = json.dumps(
            {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 200, "ignore_eos": True, "stream": stream}
        ).encode()
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        try:
            received = b""
            while stream and b"data: " not in received:  # a token arrived
                received += sock.recv(65536)
            _wait_until(lambda: _blocks_in_use(engine) > 0)
        finally:
            sock.close()
        assert _wait_until(lambda: _blocks_in_use(engine) == 0) < 1.0
        _wait_until(lambda: not engine.engine.has_unfinished_requests())  # async scheduling: one step in flight
    finally:
        engine.engine.step = real_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_localhost_and_sigterm_drains(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "folovllm",
            "serve",
            "--model",
            "random:tiny-llama",
            "--device",
            "cpu",
            "--max-model-len",
            "256",
            "--kv-cache-memory",
            str(2**20),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _healthy(url), timeout=60)
        body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True, "return_token_ids": True}
        with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]"
        assert sum(len(json.loads(e[6:])["choices"][0]["token_ids"]) for e in events[:-1]) == 200
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log and "Finished server process" in log
        assert not _healthy(url)
    finally:
        proc.kill()
        proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=1).status_code == 200
    except httpx2.TransportError:
        return False


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_report_prefix_cache_queries_and_hits(tiny_checkpoint):
    """M6 on: a prompt sent twice is a hit the second time, and /metrics counts it (vLLM's counter pair)."""
    engine = AsyncLLM.from_milestone(str(tiny_checkpoint("llama")), **{**TINY, "milestone": "M6"})
    with ServerThread(engine, served_model_name="tiny") as server:
        prompt = [(7 * j) % 400 + 3 for j in range(40)]  # 40 tokens: two full 16-token blocks to share
        for _ in range(2):
            _client(server).completions.create(model="tiny", prompt=prompt, max_tokens=2)
        text = httpx2.get(f"{server.url}/metrics").text
        stats = engine.engine.prefix_cache_stats
        assert _metric(text, "folovllm:prefix_cache_queries_total") == stats.queries > 0
        assert _metric(text, "folovllm:prefix_cache_hits_total") == stats.hits == 32
    engine.shutdown(drain=False)
