"""#15, twenty-third session: a different decode structure, timed beside the engine's tuned Gluon plans and bf16.

``ops/gluon_gemv.py`` (prototype): ``mma.sync`` products with the codes as the first operand, the program's warps
splitting K among themselves (their sums meet in the program, not through global memory), words, zero points, scales
and X loaded straight from global memory one block ahead (no shared-memory ring, no barriers, no warp specialization,
no split-K reduction). Each configuration (columns per program, warps, register cap) is checked against the reference.

    PYTHONPATH=src python3 milestones/results/m7_mma_decode.py OUT.json   # H200
"""

from __future__ import annotations

import itertools
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import reference, rel_err, weight_copies  # noqa: E402

from folovllm.model_executor.layers.quantization.ops import gluon_gemv as mma  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402

CONFIGS = [(bn, w, reg) for bn, w in itertools.product((16, 32), (4, 8, 16)) for reg in (None, 96)]


def main(out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json
    from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES
    from folovllm.benchmarks.hardware import graph_time_s

    dev = torch.device("cuda")
    rows = []
    for name, (k, n) in QWEN3_8B_SHAPES.items():
        layers, dense = weight_copies(k, n, dev)
        for m in (1, 4, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            ref = reference(x, layers[0])
            tuned = ops.plan_gptq_gemm(m, n, k, 4, dev, 2)
            t = lambda fns: graph_time_s(fns, dev) * 1e6  # noqa: E731
            row = {"layer": name, "m": m, "k": k, "n": n,
                   "bf16_us": t([partial(F.linear, x, w) for w in dense]),
                   "tuned_us": t([partial(ops.launch_gptq_gemm, x, L["pairs"], L["scales"], L["zeros"], None, None, 4,
                                          128, tuned) for L in layers]), "mma": []}  # fmt: skip
            for bn, w, reg in CONFIGS:
                fn = partial(mma.launch_mma, block_n=bn, w=w, m_tile=8 if m <= 8 else 16, maxnreg=reg)
                try:
                    err = rel_err(fn(x, layers[0]["pairs"], layers[0]["scales"], layers[0]["zeros"], 128), ref)
                    us = t([partial(fn, x, L["pairs"], L["scales"], L["zeros"], 128) for L in layers])
                except Exception as e:  # a configuration that does not compile or launch is reported, not fatal
                    row["mma"].append({"block_n": bn, "warps": w, "maxnreg": reg, "error": str(e)[:200]})
                    continue
                row["mma"].append({"block_n": bn, "warps": w, "maxnreg": reg, "us": us, "err": err})
            best = min((r for r in row["mma"] if "us" in r and r["err"] < 0.02), key=lambda r: r["us"], default=None)
            print(f"{name} m={m}: bf16 {row['bf16_us']:.2f} tuned {row['tuned_us']:.2f} best mma {best}", flush=True)
            rows.append(row)
            save_json(out, provenance(dev, "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
                      | {"benchmark": "m7_mma_decode", "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
