"""#15: the warp-specialized W4A16 decode kernel (``ops/gluon_gptq.py``) against the engine's tuned plans and bf16
cuBLAS, in one run on Qwen3-8B's projections at M = 1, 4, 16; every variant checked against the reference. Where the
tuned plan is a Gluon plan, ``tuned_shift`` times it with the codes made the earlier way (``byte_perm=False``).
Beside it, the kernel's loader alone (``_stream_kernel``: the compute warps only wait for each stage and free it;
since the twenty-third session it brings each block's zero points and scales too):
the time this structure needs to bring the words and X into shared memory, with no conversion and no product.

Run from the repository root:
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py --compile   # CPU: compile for sm_90, ptxas registers
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py OUT.json    # H200
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py --tune OUT.json  # its winners into the tuned table
    PYTHONPATH=src python3 milestones/results/m7_ws_decode.py --variants OUT.json  # H200: tuned plan vs variants
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import reference, rel_err, weight_copies  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402
from folovllm.triton_utils.offline_compile import ptxas_report  # noqa: E402


@gluon.jit
def _drain_partition(ready, empty, count, STAGES: gl.constexpr):
    for i in range(count):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        mbarrier.arrive(empty.index(s), count=1)


@gluon.jit
def _stream_kernel(w_desc, x_desc, z_desc, s_desc, K, blocks_per_split, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The decode kernel's loader with compute warps that only free each stage once it has landed."""
    PACK: gl.constexpr = 8
    total = gl.cdiv(K, 16 * PACK)
    first = gl.program_id(1) * blocks_per_split
    count = gl.maximum(gl.minimum(first + blocks_per_split, total) - first, 0)
    w_bufs, x_bufs, z_bufs, s_bufs, ready, empty = ws.ring(w_desc, x_desc, z_desc, STAGES, PACK)
    off_n = gl.program_id(0) * BLOCK_N
    # fmt: off
    gl.warp_specialize([
        (_drain_partition, (ready, empty, count, STAGES)),
        (ws._load_partition, (w_desc, x_desc, z_desc, s_desc, ready, empty, w_bufs, x_bufs, z_bufs, s_bufs, first,
                              count, off_n, (K - 1) // 128, 128, STAGES, PACK)),
    ], [1], [24])
    # fmt: on


def stream(x: torch.Tensor, layer: dict, plan: ws.WsPlan) -> None:
    k, n = x.shape[1], layer["pairs"].shape[1]
    descs = ws.descriptors(x, layer["pairs"], layer["scales"], layer["zeros"], plan)
    per_split = ops.cdiv(ops.cdiv(k, 128), plan.split_k)
    grid = (ops.cdiv(n, plan.block_n), plan.split_k)
    _stream_kernel[grid](*descs, k, per_split, BLOCK_N=plan.block_n, STAGES=plan.stages, num_warps=4,
                         maxnreg=plan.maxnreg)  # fmt: skip


def plans(k: int, m: int) -> list[ws.WsPlan]:
    """Tile width, register cap (programs per SM), compute warps, rows per product and K split; four stages, products
    waited for one by one (the first run: eight stages and asynchronous products were never faster by more than 3%)."""
    blocks = ops.cdiv(k, 128)
    out = []
    for m_tile, split in itertools.product((8, 16) if m <= 8 else (16,), (1, 2, 4, 8, 16)):
        if ops.cdiv(blocks, split) < 2:
            continue
        for block_n, maxnreg in itertools.product((64, 128), (80, 64, 48)):
            out.append(ws.WsPlan(block_n, split, 4, False, maxnreg, 4, m_tile))
        for maxnreg in (80, 64):
            out.append(ws.WsPlan(128, split, 4, False, maxnreg, 8, m_tile))
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
        for plan in (ws.WsPlan(64, 2, 4, True), ws.WsPlan(128, 4, 4, False, 64, 8), ws.WsPlan(128, 1, 8, True, 48),
                     ws.WsPlan(128, 2, 4, False, 64, 4, 8), ws.WsPlan(128, 2, 4, False, 64, 4, 8, False)):  # fmt: skip
            if m > plan.m_tile:
                continue
            got = ws.launch_gptq_decode_ws(x, qweight, scales, zeros, bias, bits, group, plan)
            rows.append({"k": k, "n": n, "bits": bits, "group_size": group, "m": m, "bias": with_bias,
                         "plan": dataclasses.asdict(plan), "err": rel_err(got, ref)})  # fmt: skip
            print("check", rows[-1], flush=True)
    return rows


def measure(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rows = []
    check_rows = checks(dev)
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
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
            if tuned.ws:  # the same plan with the codes made by Gluon integer operations (before _byte_perm_asm)
                shift = dataclasses.replace(ops.as_ws_plan(tuned, m), byte_perm=False)
                row["tuned_shift"] = timed(partial(run_ws, plan=shift))
            for plan in plans(k, m):
                try:
                    row["ws"].append(dataclasses.asdict(plan) | timed(partial(run_ws, plan=plan)))
                except Exception as exc:  # a plan that does not compile or launch is recorded, not fatal
                    row["ws"].append(dataclasses.asdict(plan) | {"error": repr(exc)[:300]})
            good = [r for r in row["ws"] if "us" in r and r["err"] < 0.02]
            best = min(good, key=lambda r: r["us"]) if good else None
            row["best_ws"] = best
            if m == 1:
                row["stream"] = []
                for split, maxnreg in itertools.product((1, 2, 4, 8, 16), (80, 64, 48)):
                    if ops.cdiv(ops.cdiv(k, 128), split) >= 2:
                        plan = ws.WsPlan(128, split, 4, False, maxnreg, 4, 8)
                        us = graph_time_s([partial(stream, x, L, plan) for L in layers], dev) * 1e6
                        row["stream"].append({"split_k": split, "maxnreg": maxnreg, "us": us})
                row["best_stream_us"] = min(r["us"] for r in row["stream"])
            print(f"{name} m={m}: bf16 {row['bf16_us']:.1f} us, tuned {row['tuned']['us']:.1f} (shift "
                  f"{row.get('tuned_shift', {}).get('us', float('nan')):.1f}), ws "
                  f"{best['us'] if best else float('nan'):.1f}, stream {row.get('best_stream_us', 0):.1f} {best}",
                  flush=True)  # fmt: skip
            rows.append(row)
    save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": "m7_ws_decode", "checks": check_rows, "rows": rows})  # fmt: skip


def variants(out: str) -> None:
    """The large projections at M = 1 and 4, where the compute warps are the limit: each one's tuned Gluon plan beside
    itself with asynchronous products (one wait per block), a deeper ring and two compute warpgroups."""
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rows = []
    for name in ("gate_up_proj", "down_proj"):
        k, n = QWEN3_8B_SHAPES[name]
        layers, _ = weight_copies(k, n, dev)
        for m in (1, 4):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            base = ops.as_ws_plan(ops.plan_gptq_gemm(m, n, k, 4, dev, 2), m)
            row = {"layer": name, "m": m, "k": k, "n": n, "plans": []}
            for plan in (base, dataclasses.replace(base, async_mma=True), dataclasses.replace(base, stages=6),
                         dataclasses.replace(base, async_mma=True, stages=6), dataclasses.replace(base, num_warps=8),
                         dataclasses.replace(base, num_warps=8, async_mma=True), dataclasses.replace(base, maxnreg=64),
                         dataclasses.replace(base, maxnreg=96)):  # fmt: skip

                def run(layer, plan=plan):
                    return ws.launch_gptq_decode_ws(x, layer["pairs"], layer["scales"], layer["zeros"], None, 4, 128, plan)

                try:
                    err = rel_err(run(layers[0]), ref)
                    us = graph_time_s([partial(run, layer) for layer in layers], dev) * 1e6
                    row["plans"].append(dataclasses.asdict(plan) | {"us": us, "err": err})
                except Exception as exc:  # recorded, not fatal
                    row["plans"].append(dataclasses.asdict(plan) | {"error": repr(exc)[:300]})
                print(name, m, row["plans"][-1], flush=True)
            rows.append(row)
    save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": "m7_ws_decode variants", "rows": rows})  # fmt: skip


def compile_only() -> None:
    """Compile every plan for sm_90 on this machine and report ptxas's registers and the shared memory."""
    for plan in plans(4096, 1):
        asm = ws.compile_ws_plan(plan)
        print(plan, "shared", asm["shared"], ptxas_report(asm["ptx"]), flush=True)


def tune(path: str) -> None:
    """Write into the tuned table (merged) each (projection, M) whose fastest correct Gluon plan beat the tuned plan
    by 2% or more in this run, as a ``ws`` plan; only plans with the rows per product the engine picks (8 up to 8
    rows, else 16) qualify."""
    import json

    result = json.loads(open(path).read())
    plans = {}
    for row in result["rows"]:
        m_tile = 8 if row["m"] <= 8 else 16
        good = [r for r in row["ws"] if "us" in r and r["err"] < 0.02 and r["m_tile"] == m_tile and not r["async_mma"]]
        best = min(good, key=lambda r: r["us"], default=None)
        if best is None or best["us"] > 0.98 * row["tuned"]["us"]:
            continue
        per_split = ops.cdiv(ops.cdiv(row["k"], 128), best["split_k"])
        plan = ops.GemmPlan(16, best["block_n"], False, best["split_k"], per_split, best["num_warps"], best["stages"],
                            swap_ab=True, pairs=True, ws=True, maxnreg=best["maxnreg"])  # fmt: skip
        plans[ops.tuned_key(4, row["m"], row["k"], row["n"])] = dataclasses.asdict(plan)
        print(f"{row['layer']} m={row['m']}: {row['tuned']['us']:.1f} -> {best['us']:.1f} us", plan)
    source = {key: result[key] for key in ("commit", "date", "gpu")} | {"from": os.path.basename(path)}
    print(ops.write_tuned_plans(result["gpu"], plans, source, merge=True))


if __name__ == "__main__":
    {"--compile": compile_only, "--tune": lambda: tune(sys.argv[2]), "--variants": lambda: variants(sys.argv[2])}.get(
        sys.argv[1], lambda: measure(sys.argv[1])
    )()
