"""``watch_compiles``: records Triton's post-compile callbacks by kernel and signature, keeps an earlier hook working,
and puts it back afterwards. On a GPU, a real kernel compiles once per specialization."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402

from folovllm.triton_utils.jit_watch import describe_variant, watch_compiles  # noqa: E402


def fire(name: str) -> None:
    knobs.runtime.jit_post_compile_hook(key=None, repr=name, fn=SimpleNamespace(name=name), compile={},
                                        is_manual_warmup=False, already_compiled=False)  # fmt: skip


def test_counts_by_kernel_and_chains_the_previous_hook(monkeypatch):
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda *, fn, **kw: seen.append(fn.name))
    previous = knobs.runtime.jit_post_compile_hook
    with watch_compiles() as compiled:
        fire("rms_norm")
        fire("rms_norm")
        fire("paged_attention")
    assert compiled.by_kernel == {"rms_norm": 2, "paged_attention": 1}
    assert compiled.variants == ["rms_norm", "rms_norm", "paged_attention"]
    assert compiled.record() == {
        "triton_compiles": {"rms_norm": 2, "paged_attention": 1},
        "triton_compiled_variants": ["rms_norm", "rms_norm", "paged_attention"],
    }
    assert seen == ["rms_norm", "rms_norm", "paged_attention"]
    assert knobs.runtime.jit_post_compile_hook is previous


def test_a_variant_names_each_argument_with_its_type_specialization_and_constants():
    """Shaped as Triton 3.6 hands it over: a signature by name, constexprs and attributes by parameter index."""
    compile = {
        "signature": {"x": "*bf16", "n": "i32", "stride": "i32", "BLOCK": "constexpr"},
        "constants": {(3,): 64},
        "configs": [{(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}],
    }
    repr = "k[num_warps=4, num_stages=3](x: (, n: '"
    assert describe_variant(repr, compile) == "k[num_warps=4, num_stages=3](x: *bf16/16, n: i32, stride: i32/16, BLOCK=64)"
    assert describe_variant("k[...](?)", {}) == "k[...](?)"  # another Triton: its own text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter compiles nothing")
def test_counts_one_compile_per_specialization_on_gpu():
    import triton.language as tl

    @triton.jit
    def add_one(x, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(x + o, tl.load(x + o, mask=o < n) + 1, mask=o < n)

    x = torch.zeros(64, device="cuda")
    with watch_compiles() as compiled:
        add_one[(1,)](x, 5, BLOCK=64)
        add_one[(1,)](x, 7, BLOCK=64)  # same specialization: no compile
        add_one[(1,)](x, 32, BLOCK=64)  # a multiple of 16: a new specialization
    assert compiled.by_kernel == {"add_one": 2}
    assert len(compiled.variants) == 2 and all("add_one[" in v and "BLOCK=64" in v for v in compiled.variants)
    assert "x: *fp32/16, n: i32," in compiled.variants[0] and "n: i32/16" in compiled.variants[1]
