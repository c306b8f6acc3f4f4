"""A first timing of the sixth session's W4A16 kernels on the GPU, before the full sweep (stage ``gptqprobe``).

On Qwen3-8B's projections, in CUDA graphs over weights beyond L2 (``bench gptq``'s method): at M = 16 the
tuned ``tl.dot`` plan against the same tiles with the operands swapped (``swap_ab``, Hopper ``wgmma``); at
M = 256 the default prefill plan against whole-block products (``block_dot``); at M = 1 the tuned GEMV against
the widened grid's narrow plans; act-order at M = 16 and 256 (X permuted once) against plain. Usage:
``python3 milestones/results/gptq_probe.py OUT.json``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from folovllm.benchmarks.common import provenance, save_json
from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES, _Operands
from folovllm.model_executor.layers.quantization.ops.gptq_gemm import plan_gptq_gemm, split_k_for
from folovllm.utils import cdiv


def variants(m: int, k: int, n: int, device: torch.device) -> list:
    base = plan_gptq_gemm(m, n, k, 4, device)
    plans = [base]
    if m == 16:
        plans += [dataclasses.replace(base, block_n=bn, num_warps=w, swap_ab=True) for bn in (64, 128, 256) for w in (4, 8)]
    elif m == 256:
        plans += [dataclasses.replace(base, block_m=bm, block_n=bn, num_warps=w, num_stages=s, block_dot=True)
                  for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for s in (2, 3)]  # fmt: skip
    elif m == 1:
        for bn, w in ((32, 2), (32, 4), (64, 2)):
            split, per = split_k_for(cdiv(n, bn), cdiv(k, 128), 32 * 132, 1)
            plans.append(dataclasses.replace(base, block_n=bn, num_warps=w, split_k=split, blocks_per_split=per))
    return list(dict.fromkeys(plans))


@torch.inference_mode()
def main(out: str) -> None:
    dev = torch.device("cuda")
    rows = []
    for act_order in (False, True):
        for name, (k, n) in QWEN3_8B_SHAPES.items():
            ops = _Operands(k, n, 4, 128, act_order, dev, torch.bfloat16)
            for m in (16, 256) if act_order else (1, 16, 256):
                x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
                dense = ops.time_dense(x)
                for plan in variants(m, k, n, dev)[: 1 if act_order else None]:
                    row = {"layer": name, "m": m, "act_order": act_order, "plan": dataclasses.asdict(plan),
                           "bf16_us": dense * 1e6}  # fmt: skip
                    try:
                        err = ops.max_rel_err(x, plan)
                        t = ops.time_gptq(x, plan)
                    except Exception as exc:  # a tile that does not fit
                        rows.append(row | {"error": str(exc)[:200]})
                        continue
                    rows.append(row | {"gptq_us": t * 1e6, "speedup": dense / t, "max_rel_err": err})
                    print(name, m, act_order, plan, f"{t * 1e6:.1f} us, {dense / t:.2f}x bf16", flush=True)
            del ops
            torch.cuda.empty_cache()
    save_json(out, {"benchmark": "gptq_probe", **provenance(dev, "random:qwen3-8b", torch.bfloat16), "results": rows})


if __name__ == "__main__":
    main(sys.argv[1])
