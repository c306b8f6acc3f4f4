"""#15: the warp-specialized W4A16 decode kernel (``ops/gluon_gptq.py``) against the engine's tuned Triton plans and
bf16 cuBLAS, in one run on Qwen3-8B's projections at M = 1, 4, 16; every variant checked against the reference.

Run from the repository root:
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py --compile   # CPU: compile for sm_90, ptxas registers
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py OUT.json    # H200
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import random_layer, reference, rel_err  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.triton_utils.offline_compile import ptxas_report  # noqa: E402


def plans(k: int) -> list[ws.WsPlan]:
    blocks = ops.cdiv(k, 128)
    out = []
    for block_n, stages, async_mma, split in itertools.product((64, 128), (4, 8), (False, True), (1, 2, 4, 8, 16)):
        if ops.cdiv(blocks, split) >= 2:
            out.append(ws.WsPlan(block_n, split, stages, async_mma, 80))
    return out


def checks(dev: torch.device) -> list[dict]:
    """Cases the Qwen3 shapes do not reach: a partial column tile, bias, per-channel scales, 2-bit codes, M = 3."""
    rows = []
    gen = torch.Generator(device=dev).manual_seed(7)
    for k, n, bits, group, m, with_bias in ((4096, 4160, 4, 128, 3, True), (2048, 1024, 4, -1, 16, False),
                                            (2048, 1024, 2, 256, 1, False), (1024, 512, 4, 256, 5, True)):  # fmt: skip
        codes = torch.randint(0, 2**bits, (k, n), device=dev, generator=gen)
        groups = 1 if group == -1 else k // group
        scales = (torch.rand(groups, n, device=dev, generator=gen) * 0.01 + 0.001).half()
        zeros = torch.randint(0, 2**bits, (groups, n), device=dev, generator=gen).half()
        qweight = ops.pack_for_kernel(codes, bits)
        bias = torch.randn(n, device=dev, generator=gen).bfloat16() if with_bias else None
        x = torch.randn(m, k, device=dev, generator=gen).bfloat16()
        ref = ops.gptq_gemm_reference(x.float(), qweight, scales, zeros, None, bias, bits, group).float()
        for plan in (ws.WsPlan(64, 2, 4, True), ws.WsPlan(128, 4, 4, False), ws.WsPlan(128, 1, 8, True)):
            got = ws.launch_gptq_decode_ws(x, qweight, scales, zeros, bias, bits, group, plan)
            rows.append({"k": k, "n": n, "bits": bits, "group_size": group, "m": m, "bias": with_bias,
                         "plan": dataclasses.asdict(plan), "err": rel_err(got, ref)})  # fmt: skip
            print("check", rows[-1], flush=True)
    return rows


def measure(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import copies_beyond_l2, graph_time_s

    dev = torch.device("cuda")
    rows = []
    check_rows = checks(dev)
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layer_bytes = k * n // 2 + 4 * (k // 128) * n
        layers = [random_layer(k, n, dev, seed) for seed in range(copies_beyond_l2(layer_bytes, dev))]
        dense = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(copies_beyond_l2(2 * k * n, dev))]
        for m in (1, 4, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)

            def run_tuned(layer):
                return ops.launch_gptq_gemm(x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128, tuned)

            def run_ws(layer, plan):
                return ws.launch_gptq_decode_ws(x, layer["pairs"], layer["scales"], layer["zeros"], None, 4, 128, plan)

            def timed(fn) -> dict:
                err = rel_err(fn(layers[0]), ref)
                return {"us": graph_time_s([partial(fn, layer) for layer in layers], dev) * 1e6, "err": err}

            row = {"layer": name, "m": m, "k": k, "n": n, "tuned_plan": dataclasses.asdict(tuned),
                   "bf16_us": graph_time_s([partial(F.linear, x, w) for w in dense], dev) * 1e6,
                   "tuned": timed(run_tuned), "ws": []}  # fmt: skip
            for plan in plans(k):
                try:
                    row["ws"].append(dataclasses.asdict(plan) | timed(partial(run_ws, plan=plan)))
                except Exception as exc:  # a plan that does not compile or launch is recorded, not fatal
                    row["ws"].append(dataclasses.asdict(plan) | {"error": repr(exc)[:300]})
            good = [r for r in row["ws"] if "us" in r and r["err"] < 0.02]
            best = min(good, key=lambda r: r["us"]) if good else None
            row["best_ws"] = best
            print(f"{name} m={m}: bf16 {row['bf16_us']:.1f} us, tuned {row['tuned']['us']:.1f}, ws "
                  f"{best['us'] if best else float('nan'):.1f} {best}", flush=True)  # fmt: skip
            rows.append(row)
    save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": "m7_ws_decode", "checks": check_rows, "rows": rows})  # fmt: skip


def compile_only() -> None:
    """Compile every plan for sm_90 on this machine and report ptxas's registers and the shared memory."""
    for plan in plans(4096):
        asm = ws.compile_ws_plan(plan)
        print(plan, "shared", asm["shared"], ptxas_report(asm["ptx"]), flush=True)


if __name__ == "__main__":
    compile_only() if sys.argv[1] == "--compile" else measure(sys.argv[1])
