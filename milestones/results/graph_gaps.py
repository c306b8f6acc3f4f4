"""#15, twentieth session: do CUDA graphs captured later in a process replay their kernels with longer gaps?

``m7_gaps.py`` found a decode graph's kernels waiting 0.5 µs after each other instead of 0.1 µs in some engines, and
the pattern followed how many graphs the process had captured before, not the engine's settings. This probe leaves
the engine out: it captures ``GRAPHS`` graphs of the same chain of ``KERNELS`` tiny kernels, replays each, and
reports the time per kernel by capture index; then it destroys them all and captures one more. Writes one JSON.

    python3 milestones/results/graph_gaps.py OUT.json
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

from folovllm.benchmarks.common import provenance

KERNELS, GRAPHS, REPLAYS = 400, 24, 50


def chain(x: torch.Tensor) -> None:
    for _ in range(KERNELS):
        x.add_(1.0)


def capture(x: torch.Tensor) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(x)
    return graph


def us_per_kernel(graph: torch.cuda.CUDAGraph) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPLAYS / KERNELS * 1e6


def main(out: str) -> None:
    x = torch.zeros(1024, device="cuda")
    chain(x)  # warm the kernel up outside any graph
    graphs = [capture(x) for _ in range(GRAPHS)]
    by_index = [us_per_kernel(g) for g in graphs]
    again = [us_per_kernel(g) for g in graphs]  # replay order does not matter if the index does
    del graphs
    gc.collect()
    torch.cuda.synchronize()
    after = us_per_kernel(capture(x))
    result = {"probe": "graph_gaps", **provenance(torch.device("cuda"), "none", torch.float32), "kernels": KERNELS,
              "replays": REPLAYS, "us_per_kernel_by_capture_index": by_index, "second_pass": again,
              "after_destroying_all": after}  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print([round(v, 2) for v in by_index], round(after, 2))


if __name__ == "__main__":
    main(sys.argv[-1])
