"""#15: what the Gluon decode kernel's warps wait on, from Nsight Compute (on the H200 box at /usr/local/cuda/bin).

``run`` launches the engine's tuned plan for ``gate_up_proj`` and ``down_proj`` of Qwen3-8B at M = 1 twice each
(the first launch compiles); stage ``permstalls`` runs it under ``ncu --page raw --csv`` with the warp-state and
scheduler sections, and ``collect`` keeps each shape's second launch: issue-slot use, the average number of warps
stalled per issued instruction by reason (all warps of the program, the loader warp included) and (since the
eighteenth session's run, whose raw CSV is ``M7-ws-stalls-h200.csv``) the launch's waves and occupancy limits.

    ncu ... python3 milestones/results/m7_ws_stalls.py run > stalls.csv
    python3 milestones/results/m7_ws_stalls.py collect stalls.csv OUT.json
"""

from __future__ import annotations

import csv
import io
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import random_layer  # noqa: E402

from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402

LAYERS = ("gate_up_proj", "down_proj")


def run() -> None:
    dev = torch.device("cuda")
    for name in LAYERS:
        k, n = QWEN3_8B_SHAPES[name]
        layer = random_layer(k, n, dev, seed=0)
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        plan = ops.plan_gptq_gemm(1, n, k, 4, dev, 2)
        for _ in range(2):
            ops.launch_gptq_gemm(x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128, plan)
        torch.cuda.synchronize()


def collect(path: str, out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json

    text = open(path).read()
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"') :])))
    header, units, kernels = rows[0], rows[1], rows[2:]
    wanted = (
        "stalled",
        "issue_active",
        "inst_executed",
        "Kernel Name",
        "gpu__time_duration",
        "warps_active",
        "launch__waves",
        "launch__occupancy_limit",
        "launch__block_size",
        "launch__grid_size",
    )
    keep = [i for i, h in enumerate(header) if any(w in h for w in wanted)]
    results = []
    for name, row in zip(LAYERS, kernels[1::2]):
        metrics = {header[i]: row[i] for i in keep}
        results.append({"layer": name, "m": 1, "units": {header[i]: units[i] for i in keep}, "metrics": metrics})
    save_json(out, provenance(torch.device("cuda"), "random 4-bit layers, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": "m7_ws_stalls", "results": results})  # fmt: skip


if __name__ == "__main__":
    run() if sys.argv[1] == "run" else collect(sys.argv[2], sys.argv[3])
