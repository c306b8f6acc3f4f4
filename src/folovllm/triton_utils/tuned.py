"""Kernel plans tuned per GPU model: ``configs/<kernel>_<GPU>.json`` next to the kernel.

A sweep on one GPU model times every plan of a kernel per shape and writes the fastest with its
provenance; every later launch on that GPU model, in any process, reads them back (vLLM keeps its
tuned Triton configs per device the same way). Used by the skinny GEMM (M4) and the W4A16 kernel (M7).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True)
class TunedTable(Generic[P]):
    """Where one kernel's tuned plans live, and the plan type a JSON entry is read into."""

    directory: Path
    kernel: str
    plan: Callable[..., P]

    def path(self, gpu_name: str) -> Path:
        """``<directory>/<kernel>_NVIDIA_H200.json`` for ``gpu_name`` "NVIDIA H200"."""
        return self.directory / f"{self.kernel}_{gpu_name.replace(' ', '_')}.json"

    def plans(self, gpu_name: str) -> dict[str, P]:
        """Shape key -> plan for this GPU model (empty without a table); read once per file."""
        return _read(self.path(gpu_name), self.plan)

    def write(self, gpu_name: str, plans: dict[str, dict[str, Any]], source: dict[str, Any], merge: bool = False) -> Path:
        """Save a sweep's fastest plans for this GPU model, with where they were measured (``source``).

        ``merge`` keeps the table's other entries (a sweep of some shapes only); the file then records
        which keys this sweep wrote and the previous file's source for the rest."""
        path = self.path(gpu_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if merge and path.is_file():
            previous = json.loads(path.read_text())
            kept = {key: plan for key, plan in previous["plans"].items() if key not in plans}
            source = {**source, "wrote": sorted(plans), "kept_from": previous["source"]}
            plans = dict(sorted({**kept, **plans}.items()))
        path.write_text(json.dumps({"source": source, "plans": plans}, indent=1) + "\n")
        _read.cache_clear()
        return path


@cache
def _read(path: Path, plan: Callable[..., P]) -> dict[str, P]:
    if not path.is_file():
        return {}
    return {key: plan(**fields) for key, fields in json.loads(path.read_text())["plans"].items()}
