"""Step inputs that live for the whole run: filled in place on the host, copied once to the device.

Building fresh tensors every step costs an allocation, a Python-list
conversion and a pageable (synchronous) copy per tensor. A ``CpuGpuBuffer``
is allocated once at its largest size: a pinned host tensor (written through a
numpy view, which is cheap) and its device twin. A CUDA graph captures the
device twin's address, so replays read whatever the step copied into it.
"""

from __future__ import annotations

import numpy as np
import torch


class CpuGpuBuffer:
    def __init__(self, *shape: int, dtype: torch.dtype, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.cpu = torch.zeros(*shape, dtype=dtype, pin_memory=pin)
        self.np: np.ndarray = self.cpu.numpy()
        self.gpu = torch.zeros(*shape, dtype=dtype, device=device) if device.type != "cpu" else self.cpu

    def copy_to_gpu(self, n: int | None = None) -> torch.Tensor:
        """Send the first ``n`` rows (all by default) and return the device view of them."""
        if self.gpu is self.cpu:
            return self.cpu[:n]
        return self.gpu[:n].copy_(self.cpu[:n], non_blocking=True)
