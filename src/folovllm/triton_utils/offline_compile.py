"""Compile a Triton kernel for an NVIDIA GPU on a machine without one, to read what the compiler made of it.

Triton's front end, its GPU passes and LLVM all run on the CPU; only running the result needs
the GPU. The intermediate text answers questions a timing cannot: which layout each tensor got,
where values move between layouts through shared memory (``convert_layout`` in TTGIR, then
``bar.sync`` barriers in PTX), how many instructions the inner loop holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

import triton
from triton.runtime.jit import JITFunction

STAGES = ("ttir", "ttgir", "llir", "ptx")


def compile_for_gpu(
    kernel: Any,
    types: dict[str, str],
    constexprs: dict[str, Any],
    divisible_by_16: tuple[str, ...] = (),
    capability: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    maxnreg: int | None = None,
) -> dict[str, str]:
    """``{stage: text}`` (``ttir`` but for Gluon, ``ttgir``, ``llir``, ``ptx``) of ``kernel`` compiled for compute capability
    ``capability``, and ``shared``: the bytes of shared memory one program allocates (as text). ``types``
    gives every runtime argument's Triton type (``"*bf16"``, ``"i32"``), ``constexprs`` every constexpr's
    value; pointers and the integers named in ``divisible_by_16`` are specialized as 16-divisible, as
    launches with aligned tensors and round sizes are. Gluon kernels compile too (a TMA descriptor's type is
    ``"tensordesc<i32[16, 128],NVMMASharedLayout(...)>"``), and ``maxnreg`` caps registers per thread.

    Under ``TRITON_INTERPRET=1`` (our CPU tests and notebooks) ``@triton.jit`` made an interpreted
    function, which cannot be compiled, and a process that has run interpreted kernels has Triton's language
    patched for the interpreter (a Gluon kernel, still compilable, then failed in its front end); a child
    Python without that switch compiles either instead."""
    args = (types, constexprs, list(divisible_by_16), capability, num_warps, num_stages, maxnreg)
    if not isinstance(kernel, JITFunction) or os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_child(kernel.fn.__module__, kernel.fn.__qualname__, args)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(kernel.arg_names)
    missing = [n for n in names if n not in types and n not in constexprs]
    if missing:
        raise ValueError(f"no type or constexpr value for {missing}")
    index = {name: (i,) for i, name in enumerate(names)}
    aligned = [n for n, t in types.items() if t.startswith("*")] + list(divisible_by_16)
    source = (GluonASTSource if kernel.is_gluon() else ASTSource)(
        fn=kernel,
        signature={n: types.get(n, "constexpr") for n in names},
        constexprs={index[n]: v for n, v in constexprs.items()},
        attrs={index[n]: [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages} | ({} if maxnreg is None else {"maxnreg": maxnreg})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    return {stage: compiled.asm[stage] for stage in STAGES if stage in compiled.asm.keys()} | {
        "shared": str(compiled.metadata.shared)
    }


def loop_instructions(ptx: str) -> list[str]:
    """The PTX instructions of a kernel's first loop (the K loop of the kernels here): from LLVM's "Inner Loop
    Header" label to the loop's closing branch, without comments, labels and directives (``.loc``)."""
    body = ptx.split("Inner Loop Header", 1)[1].split("bra.uni", 1)[0]
    return [line for line in body.splitlines() if line.strip() and not line.strip().startswith(("//", "$L", "."))]


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict[str, int]:
    """What ptxas (shipped with Triton) makes of ``ptx``: registers per thread and spilled bytes."""
    ptxas = _nvidia_tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True,
                              check=True).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) if spills else 0}


def sass(ptx: str, arch: str = "sm_90a") -> list[tuple[int, str]]:
    """The machine instructions (SASS: ptxas, then cuobjdump, both shipped with Triton) of ``ptx``, as (address,
    text). ptxas fuses and reorders what the PTX lists (an AND then an OR become one LOP3), so this is what the SM
    issues."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        subprocess.run([_nvidia_tool("ptxas"), f"-arch={arch}", ptx_path, "-o", cubin], check=True)
        text = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    return [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def sass_loop(ptx: str, marker: str = "HGMMA", arch: str = "sm_90a") -> list[str]:
    """The SASS of the loop that holds ``marker``: from the target of the first backward branch after the marker's
    last use to that branch."""
    code = sass(ptx, arch)
    last = max(i for i, (_, text) in enumerate(code) if marker in text)
    for end in range(last, len(code)):
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", code[end][1])
        if target and int(target.group(1), 16) <= code[last][0]:
            start = int(target.group(1), 16)
            return [text for addr, text in code[: end + 1] if addr >= start]
    raise ValueError(f"no loop around {marker}")


def opcode_counts(sass: list[str]) -> Counter:
    """How many of each opcode (``LOP3.LUT`` counts as ``LOP3``; a predicate such as ``@P0`` is skipped)."""
    return Counter(text.split()[text.startswith("@")].split(".")[0] for text in sass)


def _nvidia_tool(name: str) -> str:
    """The path of a CUDA tool Triton ships (``ptxas``, ``cuobjdump``)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_in_child(module: str, name: str, args: tuple) -> dict[str, str]:
    code = (
        "import importlib, json, sys\n"
        "from folovllm.triton_utils.offline_compile import compile_for_gpu\n"
        f"kernel = getattr(importlib.import_module({module!r}), {name!r})\n"
        "json.dump(compile_for_gpu(kernel, *json.load(sys.stdin)), sys.stdout)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                                    env.get("PYTHONPATH", "")] if p)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"compiling {module}.{name} for the GPU failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)
