"""#15: the batch-1 decode graph's nodes and edges, for the configs ``m7_gaps.py --switches`` found with and without
the 0.5 µs gaps before each kernel (M4; M4 with M5's graph mode; M4 with prefix caching).

Every CUDA graph is captured in debug mode; the batch-1 decode graph is written as Graphviz text
(``CUDAGraph.debug_dump``) and summarized: nodes by type, edges, nodes with more than one dependency.

    python3 milestones/results/m7_graph_dump.py OUT_DIR
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from collections import Counter

import torch

from folovllm import LLM
from folovllm.benchmarks.common import provenance

MODEL = "random:qwen3-8b"


def summary(dot: str) -> dict:
    nodes = re.findall(r'^"?(\w+)"?\s*\[.*?label="\{?(\w+)', dot, flags=re.M)
    edges = re.findall(r'^"?(\w+)"?\s*->\s*"?(\w+)"?', dot, flags=re.M)
    indegree = Counter(dst for _, dst in edges)
    return {"nodes": len(nodes), "node_types": dict(Counter(kind for _, kind in nodes)), "edges": len(edges),
            "nodes_with_several_dependencies": sum(1 for n in indegree.values() if n > 1)}  # fmt: skip


def main(out_dir: str) -> None:
    original = torch.cuda.CUDAGraph.capture_begin

    def capture_begin(self, *args, **kwargs):
        self.enable_debug_mode()
        return original(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = capture_begin
    result = {"probe": "m7_graph_dump", **provenance(torch.device("cuda"), MODEL, torch.bfloat16), "configs": {}}
    m4 = {"milestone": "M4"}
    for label, kwargs in (("M4", m4), ("M4+full-graphs", m4 | {"cudagraph_mode": "FULL"}),
                          ("M4+prefix", m4 | {"enable_prefix_caching": True})):  # fmt: skip
        llm = LLM(MODEL, max_num_seqs=1, max_model_len=512, kv_cache_memory=2**30, **kwargs)
        graph = llm.llm_engine.model_runner.cuda_graphs.graphs[1].graph
        path = os.path.join(out_dir, f"graph-{label.replace('+', '_')}.dot")
        graph.debug_dump(path)
        with open(path) as f:
            result["configs"][label] = summary(f.read())
        print(label, result["configs"][label], flush=True)
        del llm, graph
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "M7-graph-dump-h200.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
