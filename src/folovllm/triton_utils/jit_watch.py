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
from dataclasses import dataclass, field

try:
    from triton import knobs
except ImportError:  # no Triton: nothing compiles
    knobs = None


@dataclass
class Compiles:
    """What compiled: a count per kernel name, and each compilation's signature (the kernel, its launch
    options and every argument's specialization), which names the variant a warm-up missed."""

    by_kernel: Counter = field(default_factory=Counter)
    variants: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The fields a benchmark row carries (both empty when nothing compiled, as a measured run should)."""
        return {"triton_compiles": dict(self.by_kernel), "triton_compiled_variants": self.variants}


def describe_variant(repr: str, compile: dict) -> str:  # noqa: A002 (Triton's keywords)
    """One compilation as ``kernel[launch options](arg: type/specialization, ..., CONST=value, ...)``.

    Triton 3.6's own ``repr`` pairs the parameters with the characters of its cache key's
    string (``Q: (``); this reads the signature, the constexprs and the specialization
    attributes (``tt.divisibility`` 16: a pointer or integer multiple of 16; an integer
    equal to 1 becomes a constant) that the hook also receives."""
    signature = compile.get("signature")
    if not isinstance(signature, dict):
        return repr
    names = list(signature)
    attrs = (compile.get("configs") or [{}])[0]
    marks = {names[k[0]]: "/16" for k, v in attrs.items() if len(k) == 1 and k[0] < len(names) and v}
    args = [f"{n}: {t}{marks.get(n, '')}" for n, t in signature.items() if t != "constexpr"]
    consts = [f"{names[k[0]]}={v}" for k, v in (compile.get("constants") or {}).items() if len(k) == 1 and k[0] < len(names)]
    return f"{repr.split('](')[0]}]({', '.join(args + consts)})"


@contextmanager
def watch_compiles() -> Iterator[Compiles]:
    """Record the kernels that ``triton.jit`` compiled (or loaded from its disk cache) inside the block;
    any hook installed before keeps running."""
    compiled = Compiles()
    if knobs is None:
        yield compiled
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*, fn, repr, **kwargs):  # noqa: A002 (Triton's keyword)
        compiled.by_kernel[fn.name.rsplit(".", 1)[-1]] += 1
        compiled.variants.append(describe_variant(repr, kwargs.get("compile") or {}))
        return previous(fn=fn, repr=repr, **kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous
