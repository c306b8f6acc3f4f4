"""Programmatic dependent launch (PDL, Hopper on): the next kernel starts before this one has ended.

In a batch-1 decode step a projection's weights do not depend on the kernel before it, only its
activations do. A kernel launched with PDL (``launch_pdl=True``) may be scheduled once every program
of the kernel before it has executed ``griddepcontrol.launch_dependents`` (or exited), so it can
start streaming its weights while that kernel still runs; it executes ``griddepcontrol.wait`` before
it reads anything the kernel before it wrote, or writes anything, and the wait returns when that
kernel has finished and its writes are visible. Kernels that precede a PDL launch call
``launch_dependents`` first thing; launched without PDL, the next kernel ignores it.

``without_pdl`` turns both off, so that a benchmark can time the same engine with and without.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents

_disabled = False


@cache
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` use PDL: ``griddepcontrol`` exists from compute capability 9.0 (Hopper),
    CPU runs (the interpreter) skip it, and ``without_pdl`` switches it off."""
    return not _disabled and _supported(device)


@contextmanager
def without_pdl() -> Iterator[None]:
    """Launch every kernel without PDL inside (CUDA graphs captured inside keep it off)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


@triton.jit
def launch_dependents(ENABLED: tl.constexpr):
    """Let a PDL-launched next kernel be scheduled now (a hint: it still waits for this one's writes)."""
    if ENABLED:
        gdc_launch_dependents()


@gluon.jit
def grid_wait():
    """``griddepcontrol.wait`` in a Gluon kernel: returns once the kernel before has finished and its writes are
    visible; at once when this kernel was launched without PDL."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def grid_launch_dependents():
    """``griddepcontrol.launch_dependents`` in a Gluon kernel: a PDL-launched next kernel may be scheduled now."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip
