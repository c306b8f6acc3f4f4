"""``AsyncLLM``: one ``LLMEngine`` serving many asyncio callers (vLLM's online API).

The engine is synchronous PyTorch: a ``step()`` holds its caller for a whole
forward. So the engine runs on its own thread, and the asyncio loop (sockets,
HTTP parsing, streaming) never waits for a forward. The two sides talk through
two queues:

- inbox (any thread -> engine thread): closures such as "add this request" or
  "abort that one", run between two steps, so the engine is only ever touched
  by its own thread;
- one ``RequestOutputCollector`` per request (engine thread -> the request's
  event loop): the newest output waits there until the request's coroutine
  takes it. A slow reader never slows the engine and never piles outputs up:
  it finds the latest cumulative output and takes what is new since its last read.

``SamplingParams.output_kind`` says what the caller reads (vLLM's ``RequestOutputKind``):
the engine is always asked for cumulative outputs (or FINAL_ONLY's one), and DELTA
is cut by the collector, once per read however many steps passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from folovllm.engine.llm_engine import LLMEngine, PromptType
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: no request can be served any more."""


class RequestAbortedError(RuntimeError):
    """Raised to a request's reader when ``abort`` was called for it from elsewhere."""


@dataclass
class EngineLoad:
    """A snapshot taken on the engine thread between two steps (for ``/metrics``)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_used_kv_blocks: int
    prefix_cache_queries: int = 0  # running totals, in prompt tokens (M6; zero without prefix caching)
    prefix_cache_hits: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0


class RequestOutputCollector:
    """One request's output queue, of length one: a newer output replaces an unread one.

    Outputs are cumulative, so replacing loses nothing; ``get`` in DELTA mode
    slices off what this reader already took, so each delta is computed once,
    however many steps passed between two reads.
    """

    def __init__(self, request_id: str, kind: RequestOutputKind) -> None:
        self.request_id = request_id
        self.kind = kind
        self.loop = asyncio.get_running_loop()
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self._sent: dict[int, tuple[int, int]] = {}  # completion index -> (tokens, chars) already returned

    def put(self, output: RequestOutput | BaseException) -> None:
        """Called on the collector's loop (the engine thread schedules it there)."""
        if not isinstance(self._latest, BaseException):
            self._latest = output
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        output, self._latest = self._latest, None
        self._ready.clear()
        if isinstance(output, BaseException):
            raise output
        assert output is not None
        return self._delta(output) if self.kind is RequestOutputKind.DELTA else _snapshot(output)

    def _delta(self, output: RequestOutput) -> RequestOutput:
        completions = []
        for c in output.outputs:
            tokens, chars = self._sent.get(c.index, (0, 0))
            n = len(c.token_ids)
            completions.append(
                replace(
                    c,
                    text=c.text[chars:],
                    token_ids=c.token_ids[tokens:],
                    logprobs=None if c.logprobs is None else c.logprobs[tokens:n],
                )
            )
            self._sent[c.index] = (n, len(c.text))
        return replace(output, outputs=completions)


def _snapshot(output: RequestOutput) -> RequestOutput:
    """The engine keeps appending to a request's logprobs list: cut it at this output's tokens."""
    return replace(
        output,
        outputs=[c if c.logprobs is None else replace(c, logprobs=c.logprobs[: len(c.token_ids)]) for c in output.outputs],
    )


_STOP = object()


class AsyncLLM:
    """``generate`` is an async iterator of ``RequestOutput``s; the engine steps on a background thread.

    ``AsyncLLM(engine)`` wraps a built engine (e.g. ``LLM(...).llm_engine``);
    ``AsyncLLM.from_milestone(model, milestone, **overrides)`` builds one the way ``LLM`` does.
    Only the engine's public API is used: ``add_request``, ``step``, ``abort_request``,
    ``has_unfinished_requests``, each called from the engine thread alone.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None] | object] = queue.SimpleQueue()
        self._collectors: dict[str, RequestOutputCollector] = {}  # engine thread only
        self._dead: BaseException | None = None
        self._dead_lock = threading.Lock()  # nothing enters the inbox after the loop's last look at it
        self._drain = True
        self._thread = threading.Thread(target=self._run, name="folovllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_milestone(cls, model: str = "smollm2-135m", milestone: str | None = None, **kwargs: Any) -> "AsyncLLM":
        from folovllm.entrypoints.llm import LLM

        return cls(LLM(model, milestone=milestone, **kwargs).llm_engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ---- the asyncio side ---------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None
    ) -> RequestOutputCollector:
        """Queue a request; returns once the engine accepted it. Bad input raises ``ValueError`` here."""
        params = sampling_params or SamplingParams()
        collector = RequestOutputCollector(request_id, params.output_kind)
        if params.output_kind is RequestOutputKind.DELTA:  # the collector cuts deltas from cumulative outputs
            params = replace(params, output_kind=RequestOutputKind.CUMULATIVE)

        def add() -> None:
            if request_id in self._collectors:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.engine.add_request(request_id, prompt, params)
            self._collectors[request_id] = collector

        await self._call(add)
        return collector

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive (as ``sampling_params.output_kind`` says), the last one ``finished``.

        Leaving early aborts the request, and its KV blocks are freed before the next
        step: at once when the task is cancelled (a client that went away) or the
        generator is closed (``contextlib.aclosing``); after a bare ``break``, when
        Python collects the generator (asyncio then closes it on its next iteration).
        """
        collector = await self.add_request(request_id, prompt, sampling_params)
        async with contextlib.aclosing(self.outputs(collector)) as outputs:  # closing us closes it, at once
            async for out in outputs:
                yield out

    async def outputs(self, collector: RequestOutputCollector) -> AsyncIterator[RequestOutput]:
        """The outputs of a request queued by ``add_request``, aborting it if the reader leaves early."""
        finished = False
        try:
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            if not finished and self._dead is None:
                self._submit(lambda: self._abort(collector.request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once the engine dropped it and freed its blocks."""
        await self._call(lambda: self._abort(request_id))

    async def get_load(self) -> EngineLoad:
        """Requests running/waiting and KV blocks in use, read between two steps."""
        return await self._call(self._load)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine thread: after the unfinished requests end (``drain``) or aborting them."""
        self._drain = drain
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def _submit(self, fn: Callable[[], None]) -> None:
        with self._dead_lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop has stopped: {self._dead!r}")
            self._inbox.put(fn)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between two steps; its result or exception comes back here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                if self._dead is not None:
                    raise EngineDeadError(f"the engine loop has stopped: {self._dead!r}")
                result, error = fn(), None
            except Exception as err:  # handed to the caller
                result, error = None, err
            _call_soon(loop, _resolve, future, result, error)

        self._submit(run)
        return await future

    # ---- the engine thread ----------------------------------------------------
    def _run(self) -> None:
        try:
            stopping = False
            while True:
                busy = self.engine.has_unfinished_requests()
                stopping |= self._run_inbox(block=not busy and not stopping)
                if stopping and not self._drain:
                    self._abort_all(EngineDeadError("the engine was shut down"))
                if not self.engine.has_unfinished_requests():
                    if stopping:
                        break
                    continue
                self._step()
        except BaseException as err:  # a loop bug must not leave callers waiting forever
            logger.exception("engine loop died")
            self._close(err)
        else:
            self._close(EngineDeadError("the engine was shut down"))

    def _close(self, reason: BaseException) -> None:
        """Refuse new work, then fail whatever is still queued or in flight."""
        with self._dead_lock:
            self._dead = reason
        self._run_inbox(block=False)
        self._publish([(c, reason) for c in self._collectors.values()])
        self._collectors.clear()

    def _run_inbox(self, block: bool) -> bool:
        """Run every queued closure (waiting for one when idle); True when asked to stop."""
        stop = False
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is _STOP:
                    stop = True
                else:
                    try:
                        item()  # type: ignore[operator]
                    except Exception:  # one bad closure must not stop the loop
                        logger.exception("engine-thread call failed")
                item = self._inbox.get_nowait()
        except queue.Empty:
            return stop

    def _step(self) -> None:
        """One engine step; its outputs go to their collectors. A failing step fails its requests, not the loop."""
        try:
            outputs = self.engine.step()
        except Exception as err:  # reported to every request in flight
            logger.exception("engine step failed; aborting the requests in flight")
            self._abort_all(err)
            return
        items = []
        for out in outputs:
            collector = self._collectors.get(out.request_id)
            if collector is None:
                continue
            if out.finished:
                del self._collectors[out.request_id]
            items.append((collector, out))
        self._publish(items)

    def _abort(self, request_id: str) -> None:
        collector = self._collectors.pop(request_id, None)
        if collector is not None:
            self.engine.abort_request(request_id)
            self._publish([(collector, RequestAbortedError(f"request {request_id!r} was aborted"))])

    def _abort_all(self, error: BaseException) -> None:
        collectors, self._collectors = self._collectors, {}
        try:
            self.engine.abort_request(list(collectors))
        finally:
            self._publish([(c, error) for c in collectors.values()])

    def _load(self) -> EngineLoad:
        sched = self.engine.scheduler
        usage = self.engine.kv_cache_manager.usage()
        prefix = self.engine.prefix_cache_stats
        return EngineLoad(
            len(sched.running), len(sched.waiting), usage.num_blocks, usage.num_used_blocks, prefix.queries, prefix.hits
        )

    @staticmethod
    def _publish(items: list[tuple[RequestOutputCollector, RequestOutput | BaseException]]) -> None:
        """Hand one step's outputs to their event loops: one wake-up per loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for collector, out in items:
            by_loop.setdefault(collector.loop, []).append((collector, out))
        for loop, batch in by_loop.items():
            _call_soon(loop, _deliver, batch)


def _deliver(batch: list[tuple[RequestOutputCollector, RequestOutput | BaseException]]) -> None:
    for collector, out in batch:
        collector.put(out)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``call_soon_threadsafe`` that tolerates a loop that has closed (its callers are gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass
