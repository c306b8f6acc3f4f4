"""Finding, reading and faking checkpoint tensors.

Only safetensors are ever read: a pickle checkpoint (``*.bin``, ``*.pt``) can run
arbitrary code when unpickled, so it is refused rather than loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def find_safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards: those named by the index if there is one, else every ``*.safetensors``."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:
            if not (folder / name).is_file():
                raise ValueError(f"{index} lists shard {name!r}, which is missing")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only {pickles}: refused: pickle checkpoints are never loaded; convert to safetensors"
        )
    raise ValueError(f"{folder} has no *.safetensors files")


def safetensors_weights_iterator(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time (on CPU), so peak memory stays one tensor."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as err:
            raise ValueError(f"corrupt safetensors file {file}: {err}") from err


def initialize_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights in place, on the parameters' own device and dtype (no CPU round trip).

    Norm weights become ones (as in a freshly initialised model), everything else ``N(0, std)``;
    quantized layers fill their own tensors (``init_dummy_weights`` of their linear method).
    The same seed gives the same weights on the same device.
    """
    params = list(model.named_parameters())
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, param in params:
            if not param.is_floating_point() or hasattr(param, "weight_loader"):
                continue  # a quantized layer's tensors: filled below
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        for module in model.modules():
            if getattr(module, "quant_method", None) is not None:
                module.quant_method.init_dummy_weights(module, generator, std)
