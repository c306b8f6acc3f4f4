"""#15, twenty-fifth session: where the prefill Gluon kernel's bytes come from, from Nsight Compute.

The prefill plans read each program's 128 rows of X once per K block from L2; the M7 chapter reads the 256-column
plans' gain at 4096 rows as halving that traffic, an estimate from the tile sizes. Here ``run`` launches, at
M = 4096 on ``qkv_proj`` and ``gate_up_proj``, the tuned plan (256 columns), the same plan at 128 columns and bf16
``F.linear``, twice each (the first launch compiles); stage ``prefilll2`` runs it under ``ncu --page raw --csv``
with the speed-of-light and compute sections plus L2 and DRAM byte counts, and ``collect`` keeps each launch's
second run: time, bytes through L2, bytes read from DRAM, their rates and the sections' throughput percentages.

    ncu ... python3 milestones/results/m7_prefill_l2.py run > l2.csv
    python3 milestones/results/m7_prefill_l2.py collect l2.csv OUT.json
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from m7_decode_limits import random_layer  # noqa: E402

from folovllm.benchmarks.gptq import QWEN3_8B_SHAPES  # noqa: E402
from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops  # noqa: E402

M = 4096
LAYERS = ("qkv_proj", "gate_up_proj")
LAUNCHES = ("gptq, 256 columns", "gptq, 128 columns", "bf16")  # per layer, in this order, each run twice


def run() -> None:
    dev = torch.device("cuda")
    for name in LAYERS:
        k, n = QWEN3_8B_SHAPES[name]
        layer = random_layer(k, n, dev, seed=0)
        dense = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
        x = torch.randn(M, k, dtype=torch.bfloat16, device=dev)
        tuned = ops.plan_gptq_gemm(M, n, k, 4, dev, 2)
        assert tuned.ws and tuned.block_n == 256, tuned
        args = (x, layer["pairs"], layer["scales"], layer["zeros"], None, None, 4, 128)
        for plan in (tuned, dataclasses.replace(tuned, block_n=128)):
            for _ in range(2):
                ops.launch_gptq_gemm(*args, plan)
        for _ in range(2):
            F.linear(x, dense)
        torch.cuda.synchronize()


UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "second": 1.0, "msecond": 1e-3, "usecond": 1e-6, "nsecond": 1e-9,
         "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}  # fmt: skip


def _value(row: list[str], units: list[str], col: dict[str, int], metric: str) -> float:
    """A metric of one profiled kernel in seconds or bytes (ncu prints each column in its own unit)."""
    return float(row[col[metric]].replace(",", "")) * UNITS[units[col[metric]]]


def collect(path: str, out: str) -> None:
    from folovllm.benchmarks.common import provenance, save_json

    text = open(path).read()
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"') :])))
    header, units, kernels = rows[0], rows[1], rows[2:]
    wanted = ("Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum", "lts__t_bytes.sum", "throughput.avg",
              "pipe_tensor_op_gmma.avg", "launch__grid_size", "launch__registers_per_thread")  # fmt: skip
    keep = [i for i, h in enumerate(header) if any(w in h for w in wanted)]
    col = {h: i for i, h in enumerate(header)}
    names = [r[col["Kernel Name"]] for r in kernels]
    ours = [r for r in kernels if "gptq" in r[col["Kernel Name"]]]
    theirs = [r for r in kernels if "gptq" not in r[col["Kernel Name"]]]
    if len(ours) != 8 or len(theirs) != 4:  # two layers x (two plans + bf16) x two runs; the raw CSV stays beside
        raise SystemExit(f"expected 8 GPTQ and 4 cuBLAS kernels, got {names}")
    launches = [
        (layer, label, row)
        for layer, pair in zip(LAYERS, (ours[:4], ours[4:]))
        for label, row in zip(LAUNCHES[:2], pair[1::2])
    ] + [(layer, LAUNCHES[2], row) for layer, row in zip(LAYERS, theirs[1::2])]
    results = []
    for layer, label, row in launches:
        seconds = _value(row, units, col, "gpu__time_duration.sum")
        l2, dram = _value(row, units, col, "lts__t_bytes.sum"), _value(row, units, col, "dram__bytes_read.sum")
        rates = {"l2_TBps": l2 / seconds / 1e12, "dram_read_TBps": dram / seconds / 1e12}
        results.append({"layer": layer, "m": M, "launch": label, "time_us": seconds * 1e6, "l2_bytes": l2,
                        "dram_read_bytes": dram, **rates, "metrics": {header[i]: row[i] for i in keep},
                        "units": {header[i]: units[i] for i in keep}})  # fmt: skip
        print(
            f"{layer:13} {label:18} {seconds * 1e6:8.1f} µs  L2 {l2 / 1e9:6.2f} GB ({l2 / seconds / 1e12:5.2f} TB/s)  "
            f"DRAM read {dram / 1e9:6.2f} GB ({dram / seconds / 1e12:5.2f} TB/s)"
        )
    save_json(out, provenance(torch.device("cuda"), "random 4-bit layers and bf16 weights, Qwen3-8B shapes", torch.bfloat16)
              | {"benchmark": "m7_prefill_l2", "results": results})  # fmt: skip


if __name__ == "__main__":
    run() if sys.argv[1] == "run" else collect(sys.argv[2], sys.argv[3])
