"""GPTQ checkpoints served by our Triton kernel (on GPUs) or a PyTorch reference (elsewhere).

``GPTQConfig`` reads ``quantization_config`` and refuses what cannot be served. ``GPTQLinearMethod``
gives each linear layer the checkpoint's four tensors (merged q/k/v and gate/up fill column ranges
of them, as dense weights fill row ranges), then, once loaded, unpacks and repacks them for the
kernel: act-order rows sorted by group (the input columns follow through ``perm``), 16-row slices
per bit field, zero points unpacked (stored ``zero - 1`` in the checkpoint, see ``unpack_zeros``) next to the scales.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from folovllm.model_executor.layers.linear import copy_weight
from folovllm.model_executor.layers.quantization.base_config import LinearMethodBase, QuantizationConfig
from folovllm.model_executor.layers.quantization.ops.gptq_gemm import (
    KERNEL_BITS,
    gptq_gemm_reference,
    launch_gptq_gemm,
    pack_for_kernel,
)
from folovllm.quantization.packing import pack_zeros, unpack_rows, unpack_zeros
from folovllm.utils import cdiv

KERNELS = ("auto", "triton", "torch")
# What a ``dynamic`` entry may change for the modules it matches (vLLM reads these; GPTQModel also records settings
# of its own quantizer there, such as ``mse``, which do not change how the weights are stored and are ignored).
OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")


@dataclass
class GPTQConfig(QuantizationConfig):
    """``bits``/``group_size``/``desc_act``/``sym`` as the checkpoint states them.

    ``kernel`` is ours, not the checkpoint's: "auto" runs the Triton kernel on CUDA and the PyTorch
    reference (dequantize, then one matmul) elsewhere; tests force "triton" on CPU (interpreter).

    ``dynamic`` (GPTQModel's per-module overrides, read as vLLM reads them): regular expressions matched from the
    start of a module's checkpoint name, in order, the first match deciding. ``"-:pattern"`` keeps the module
    dense; ``"+:pattern"`` or a bare pattern gives it the entry's ``OVERRIDABLE`` settings. GPTQModel writes
    ``{"lm_head": {"bits": 8, ...}}`` when it quantizes ``lm_head``.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    kernel: str = "auto"
    lm_head_quantized: bool = False
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)

    name = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in KERNEL_BITS:
            why = " (3-bit codes straddle 32-bit words, which our kernel does not read)" if self.bits == 3 else ""
            raise ValueError(f"GPTQ bits={self.bits!r} cannot be served{why}; supported: {KERNEL_BITS}")
        gs = self.group_size
        if gs != -1 and (not isinstance(gs, int) or gs < 16 or gs & (gs - 1)):
            raise ValueError(f"GPTQ group_size must be -1 or a power of two >= 16, got {gs!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if not isinstance(self.dynamic, dict):
            raise ValueError(
                f"GPTQ quantization_config.dynamic must be a dict of patterns to settings, got {self.dynamic!r}"
            )
        for pattern, settings in self.dynamic.items():
            if not isinstance(pattern, str) or not isinstance(settings, dict):
                raise ValueError(
                    f"GPTQ quantization_config.dynamic must map pattern strings to dicts, got {pattern!r}: {settings!r}"
                )
            try:
                re.compile(_pattern(pattern))
            except re.error as exc:
                raise ValueError(
                    f"GPTQ quantization_config.dynamic key {pattern!r} is not a regular expression: {exc}"
                ) from exc
            for key in ("desc_act", "sym"):
                if key in settings and not isinstance(settings[key], bool):
                    raise ValueError(f"GPTQ quantization_config.dynamic[{pattern!r}].{key} must be a bool")
            try:  # the settings it gives must be servable too: checked now, not when a layer is built
                self._overridden(settings)
            except ValueError as exc:
                raise ValueError(f"GPTQ quantization_config.dynamic[{pattern!r}]: {exc}") from exc

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        fmt = config.get("checkpoint_format", "gptq")
        if fmt != "gptq" or config.get("is_marlin_format"):
            raise ValueError(
                f"GPTQ checkpoint_format {fmt!r}{' (marlin)' if config.get('is_marlin_format') else ''} "
                "is not supported; supported: 'gptq'"
            )
        for key in ("bits", "group_size"):
            if key not in config:
                raise ValueError(f"GPTQ quantization_config has no {key!r}")
        return cls(
            bits=config["bits"],
            group_size=config["group_size"],
            desc_act=bool(config.get("desc_act", False)),
            sym=bool(config.get("sym", True)),
            lm_head_quantized=bool(config.get("lm_head", False)),
            dynamic={} if config.get("dynamic") is None else config["dynamic"],
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of a checkpoint we write."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": "gptq",
            "lm_head": self.lm_head_quantized,
        } | ({"dynamic": self.dynamic} if self.dynamic else {})

    def for_layer(self, prefixes: list[str]) -> "GPTQConfig | None":
        """The settings ``dynamic`` gives the modules ``prefixes`` (one layer: they must agree), None if dense."""
        found = [self._for_module(prefix) for prefix in prefixes]
        settings = [None if c is None else tuple(getattr(c, k) for k in OVERRIDABLE) for c in found]
        for prefix, setting in zip(prefixes[1:], settings[1:]):
            if setting != settings[0]:
                raise ValueError(
                    f"GPTQ quantization_config.dynamic gives {prefixes[0]} and {prefix} different settings, "
                    "but they are merged into one layer"
                )
        return found[0]

    def _for_module(self, prefix: str) -> "GPTQConfig | None":
        for pattern, settings in self.dynamic.items():
            if re.match(_pattern(pattern), prefix):
                return None if pattern.startswith("-:") else self._overridden(settings)
        return self

    def _overridden(self, settings: dict[str, Any]) -> "GPTQConfig":
        """This config with a ``dynamic`` entry's ``OVERRIDABLE`` settings (validated as the checkpoint's own are)."""
        return replace(self, dynamic={}, **{k: settings[k] for k in OVERRIDABLE if k in settings})

    def get_linear_method(self) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)


def _pattern(key: str) -> str:
    """A ``dynamic`` key without its ``+:`` / ``-:`` sign."""
    return key[2:] if key.startswith(("+:", "-:")) else key


def _sharded_loader(layer: nn.Module, param: nn.Parameter, output_dim: int, pack: int = 1):
    """Copy a checkpoint tensor into ``param``, or into the columns one projection of a merged layer owns
    (``pack`` output columns share a word in ``qzeros``)."""

    def load(loaded: torch.Tensor, shard: int | str | None, name: str) -> None:
        target = param.data
        if shard is not None:
            rows = layer.shard_rows(shard)
            target = target.narrow(output_dim, rows.start // pack, (rows.stop - rows.start) // pack)
        copy_weight(target, loaded, name)

    return load


def _shared_loader(layer: nn.Module, param: nn.Parameter):
    """``g_idx`` is one tensor for all shards: projections stacked into one layer must agree on it."""

    def load(loaded: torch.Tensor, shard: int | str | None, name: str) -> None:
        if shard is not None and layer.g_idx_source is not None and not torch.equal(param.data, loaded.to(param.device)):
            raise ValueError(
                f"{name} differs from {layer.g_idx_source}: projections merged into one layer "
                "must share one act-order permutation"
            )
        copy_weight(param.data, loaded, name)
        layer.g_idx_source = name

    return load


class GPTQLinearMethod(LinearMethodBase):
    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int) -> None:
        bits, pack = self.config.bits, 32 // self.config.bits
        if input_size % pack or output_size % pack:
            raise ValueError(
                f"GPTQ {bits}-bit packing needs input and output sizes divisible by {pack}, got {input_size} x {output_size}"
            )
        groups = 1 if self.config.group_size == -1 else cdiv(input_size, self.config.group_size)
        layer.act_dtype = torch.get_default_dtype()
        layer.g_idx_source = None
        tensors = {
            "qweight": ((input_size // pack, output_size), torch.int32, 1, 1),
            "qzeros": ((groups, output_size // pack), torch.int32, 1, pack),
            "scales": ((groups, output_size), torch.float16, 1, 1),
            "g_idx": ((input_size,), torch.int32, None, 1),
        }
        for name, (shape, dtype, output_dim, factor) in tensors.items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            param.weight_loader = (
                _shared_loader(layer, param) if output_dim is None else _sharded_loader(layer, param, output_dim, factor)
            )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Checkpoint tensors -> kernel layout: ``qweight`` repacked, ``zeros`` unpacked, ``perm`` for act-order.

        Scales stay fp16 for half-precision models and become fp32 (exactly) for fp32 ones.
        """
        bits, k, n = self.config.bits, layer.input_size, layer.output_size
        size = k if self.config.group_size == -1 else self.config.group_size
        g_idx = layer.g_idx.data.to(torch.int64)
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // size):
            raise ValueError(
                f"g_idx of a {k}-input layer does not put {size} rows in each group "
                f"(group_size={self.config.group_size}): cannot be served"
            )
        scale_dtype = torch.float32 if layer.act_dtype == torch.float32 else torch.float16
        tensors = {
            "qweight": pack_for_kernel(unpack_rows(layer.qweight.data, bits, k)[perm], bits),
            "scales": layer.scales.data.to(scale_dtype),
            "zeros": unpack_zeros(layer.qzeros.data, bits, n).to(scale_dtype).contiguous(),
            "perm": None if torch.equal(perm, torch.arange(k, device=perm.device)) else perm.to(torch.int32),
        }
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)  # the checkpoint layout is not kept: one copy of the weight in memory
        for name, tensor in tensors.items():
            layer.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        args = (layer.qweight, layer.scales, layer.zeros, layer.perm, bias, self.config.bits, self.config.group_size)
        use_kernel = self.config.kernel == "triton" or (self.config.kernel == "auto" and x.device.type == "cuda")
        if not use_kernel:
            return gptq_gemm_reference(x, *args)
        x2 = x.reshape(-1, layer.input_size)
        return launch_gptq_gemm(x2 if x2.stride(-1) == 1 else x2.contiguous(), *args).view(*x.shape[:-1], -1)

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        """Uniformly random codes around a symmetric zero point; the scale gives the weights ``std`` spread."""
        bits = self.config.bits
        levels = 2**bits
        layer.qweight.data.random_(-(2**31), 2**31, generator=generator)
        zero = torch.full((layer.qzeros.shape[0], layer.output_size), levels // 2, device=layer.qzeros.device)
        layer.qzeros.data.copy_(pack_zeros(zero, bits))
        layer.scales.data.fill_(std / ((levels**2 - 1) / 12) ** 0.5)  # a uniform code's standard deviation
        size = layer.input_size if self.config.group_size == -1 else self.config.group_size
        layer.g_idx.data.copy_(torch.arange(layer.input_size, device=layer.g_idx.device) // size)
