"""Count Triton JIT compilations, so a benchmark can say whether a measured run paid for one.

A Triton kernel compiles once per specialization (its constexprs, and whether each
integer argument is 1 or a multiple of 16), the first time a process launches it
with that specialization, and a compile takes hundreds of milliseconds: a step that
meets a new one stalls every running request. Benchmarks warm up before they
measure; this says how well that worked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

try:
    from triton import knobs
except ImportError:  # no Triton: nothing compiles
    knobs = None


@contextmanager
def watch_compiles() -> Iterator[Counter]:
    """Count the kernels that ``triton.jit`` compiled (or loaded from its disk cache) inside the block,
    by kernel name; any hook installed before keeps running."""
    compiled: Counter = Counter()
    if knobs is None:
        yield compiled
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*, fn, **kwargs):
        compiled[fn.name.rsplit(".", 1)[-1]] += 1
        return previous(fn=fn, **kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous
