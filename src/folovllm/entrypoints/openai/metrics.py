"""``GET /metrics``: Prometheus counters and histograms (vLLM's metric names, ``folovllm:`` prefix).

Latencies are measured where the client sees them: from the moment the HTTP
request was parsed to each output leaving for the socket. Queue lengths and KV
usage are read from the engine thread between two steps, only when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from folovllm.engine.async_llm import AsyncLLM
from folovllm.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServerMetrics:
    """One registry per server (several servers in one process, as in tests, do not collide)."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.num_running = Gauge("folovllm:num_requests_running", "Requests in the running batch.", registry=r)
        self.num_waiting = Gauge("folovllm:num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("folovllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", registry=r)
        self.ttft = Histogram(
            "folovllm:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "folovllm:inter_token_latency_seconds", "Time between two output tokens.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "folovllm:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "folovllm:request_success", "Finished sequences by finish reason.", ["finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("folovllm:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("folovllm:generation_tokens", "Tokens generated.", registry=r)
        # vLLM v1's prefix-cache pair: hit rate = hits / queries over any window (both in prompt tokens)
        self.prefix_queries = Counter(
            "folovllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter("folovllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self._prefix_seen = (0, 0)  # the engine's totals at the last scrape

    def track(self, arrival: float) -> "RequestTracker":
        return RequestTracker(self, arrival)

    async def render(self) -> bytes:
        load = await self.engine.get_load()
        self.num_running.set(load.num_running)
        self.num_waiting.set(load.num_waiting)
        self.kv_usage.set(load.kv_cache_usage)
        queries, hits = self._prefix_seen
        self.prefix_queries.inc(max(load.prefix_cache_queries - queries, 0))
        self.prefix_hits.inc(max(load.prefix_cache_hits - hits, 0))
        self._prefix_seen = (load.prefix_cache_queries, load.prefix_cache_hits)
        return generate_latest(self.registry)


class RequestTracker:
    """Turns one request's delta outputs into TTFT, inter-token and end-to-end observations."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        num_new = sum(len(c.token_ids) for c in out.outputs)
        if num_new:
            if self.last is None:
                m.ttft.observe(now - self.arrival)
            else:
                for _ in range(num_new):  # tokens that arrive together split the gap
                    m.itl.observe((now - self.last) / num_new)
            self.last = now
            m.generation_tokens.inc(num_new)
        if out.finished:
            m.e2e.observe(now - self.arrival)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            for c in out.outputs:
                m.success.labels(finished_reason=c.finish_reason or "unknown").inc()
