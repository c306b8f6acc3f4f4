"""Run a ``@triton.jit`` kernel on CPU tensors with Triton's interpreter (numpy, slow, exact).

Triton's supported switch is ``TRITON_INTERPRET=1`` in the environment *before*
``triton`` is first imported: ``@triton.jit`` then builds interpreted functions and
every launch runs in numpy. Our tests and CPU notebooks set it where they can
(``tests/conftest.py``). A process that imported Triton for compiling first (often
``transformers`` does it for us) gets compiled-only kernels; for those, CPU launches
switch to the interpreter for the duration of one call (``_interpreting``).

Three interpreter bugs of Triton 3.6 are patched around every CPU launch, whichever
way it was reached: scalar indexing under numpy >= 2.4, ``tl.dot`` on bf16 and bf16 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

Kernel = JITFunction | InterpretedFunction

_ORIGINAL_PATCH_TENSOR = interpreter._patch_lang_tensor
_ORIGINAL_DOT = interpreter.InterpreterBuilder.create_dot
_ORIGINAL_BINARY_OP = interpreter.InterpreterBuilder.binary_op
_FLOAT_ARITHMETIC = (np.add, np.subtract, np.multiply, np.divide)
_LANGUAGE_NAMESPACES = (tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype, tl.core.tensor_descriptor_base)


def _index_via_item(tensor: type, scope: object) -> None:
    """Triton 3.6 turns interpreter scalars into ints with ``int(array)``, which numpy >= 2.4
    refuses for its 1-element arrays (triton-lang/triton#9171); loops with runtime bounds need it."""
    _ORIGINAL_PATCH_TENSOR(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


def _bf16_as_fp32(h: interpreter.TensorHandle) -> interpreter.TensorHandle:
    if h.dtype != tl.bfloat16:
        return h
    return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _dot_bf16_as_fp32(
    self: interpreter.InterpreterBuilder, a: interpreter.TensorHandle, b: interpreter.TensorHandle, *args
) -> interpreter.TensorHandle:
    """The interpreter keeps bf16 as raw uint16 bits and its dot would multiply the bits."""
    return _ORIGINAL_DOT(self, _bf16_as_fp32(a), _bf16_as_fp32(b), *args)


def _bf16_arithmetic(
    self: interpreter.InterpreterBuilder, lhs: interpreter.TensorHandle, rhs: interpreter.TensorHandle, op: Callable
) -> interpreter.TensorHandle:
    """bf16 ``+ - * /`` would also act on the raw bits: computed in fp32, rounded to the nearest bf16 (ties to
    even), as the GPU's ``sub.bf16x2`` and friends round."""
    if lhs.dtype.scalar != tl.bfloat16 or rhs.dtype.scalar != tl.bfloat16 or op not in _FLOAT_ARITHMETIC:
        return _ORIGINAL_BINARY_OP(self, lhs, rhs, op)
    bits = op(_bf16_as_fp32(lhs).data, _bf16_as_fp32(rhs).data).astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)


@contextmanager
def _interpreter_fixes() -> Iterator[None]:
    """The three bug patches, in place for one launch only."""
    interpreter._patch_lang_tensor = _index_via_item
    interpreter.InterpreterBuilder.create_dot = _dot_bf16_as_fp32
    interpreter.InterpreterBuilder.binary_op = _bf16_arithmetic
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = _ORIGINAL_PATCH_TENSOR
        interpreter.InterpreterBuilder.create_dot = _ORIGINAL_DOT
        interpreter.InterpreterBuilder.binary_op = _ORIGINAL_BINARY_OP


@cache
def _interpreted(fn: Callable) -> InterpretedFunction:
    return InterpretedFunction(fn)


@contextmanager
def _interpreting(kernel_fn: Callable) -> Iterator[None]:
    """Let the interpreter run a kernel although Triton was imported for compiling.

    ``tl.max``, ``tl.sum``, ``tl.zeros``... are ``@triton.jit`` functions too;
    compiled ones cannot be called by the interpreter, so interpreted copies
    stand in. The interpreter also leaves some of its patches on
    ``triton.language`` behind, which would break later GPU compiles in this
    process, so every namespace it touches is restored afterwards (names it
    adds to modules stay: its rewritten functions look them up there).
    Not thread-safe: CPU launches are for tests and notebooks.
    The kernel's own ``@triton.jit`` helpers (module globals) are swapped the same way.
    """
    saved = [(ns, dict(vars(ns))) for ns in _LANGUAGE_NAMESPACES]
    for name, obj in saved[0][1].items():
        if isinstance(obj, JITFunction):
            setattr(tl, name, _interpreted(obj.fn))
    scope = kernel_fn.__globals__
    helpers = {name: obj for name, obj in scope.items() if isinstance(obj, JITFunction)}
    scope.update({name: _interpreted(obj.fn) for name, obj in helpers.items()})
    try:
        with _interpreter_fixes():
            yield
    finally:
        scope.update(helpers)
        for ns, before in saved:
            for name in set(vars(ns)) - set(before) if isinstance(ns, type) else ():
                delattr(ns, name)
            for name, value in before.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)


class _Interpreted:
    """``kernel[grid](...)`` for CPU tensors: the same kernel body, run by Triton's interpreter."""

    def __init__(self, kernel: Kernel) -> None:
        self.native = isinstance(kernel, InterpretedFunction)  # TRITON_INTERPRET=1 was set at import
        self.kernel_fn = kernel.fn
        self.fn = kernel if self.native else _interpreted(kernel.fn)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args, **kwargs) -> None:
            with _interpreter_fixes() if self.native else _interpreting(self.kernel_fn):
                self.fn[grid](*args, **kwargs)

        return launch


def for_device(kernel: Kernel, device: torch.device) -> Kernel | _Interpreted:
    """The kernel as compiled for CUDA tensors; Triton's interpreter for CPU tensors."""
    return _Interpreted(kernel) if device.type == "cpu" else kernel
