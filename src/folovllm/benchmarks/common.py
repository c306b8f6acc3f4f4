"""Provenance, workloads and the results-JSON format shared by every benchmark."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from folovllm.config import ATTENTION_BACKENDS, BATCHING_MODES


def git_commit() -> str:
    """The commit measured: ``FOLOVLLM_COMMIT`` (set when the tree travels without .git), else git."""
    if os.environ.get("FOLOVLLM_COMMIT"):
        return os.environ["FOLOVLLM_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def gpu_slug(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; CPU -> ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4", "4090", "3090"):
        if tag in name:
            return tag
    return name.replace(" ", "-")


def provenance(device: torch.device, model: str, dtype: torch.dtype) -> dict[str, Any]:
    """Everything needed to tell where a number came from and to rerun it."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "command": "folovllm " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else " ".join(sys.argv),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "model": model,
        "dtype": str(dtype).replace("torch.", ""),
    }


def save_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def write_results(path: str | None, payload: dict[str, Any]) -> None:
    """Print the JSON, and save it when ``--out`` is given."""
    print(json.dumps(payload, indent=2))
    if path:
        save_json(path, payload)


def parse_range(text: str) -> tuple[int, int]:
    """``"100:1024"`` -> (100, 1024); ``"128"`` -> (128, 128)."""
    lo, _, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def random_workload(
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    seed: int = 0,
    vocab: int = 10000,
) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's throughput workload: random token prompts, then random output lengths.

    With the defaults it asks for exactly 133,966 output tokens.
    """
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab) for _ in range(rng.randint(*input_len))] for _ in range(num_prompts)]
    outputs = [rng.randint(*output_len) for _ in range(num_prompts)]
    return prompts, outputs


def mixed_workload(
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    long_input_len: tuple[int, int] = (4096, 8192),
    long_fraction: float = 0.1,
    seed: int = 0,
    vocab: int = 10000,
) -> tuple[list[list[int]], list[int]]:
    """W-like requests, of which ``round(long_fraction * num_prompts)`` get a long prompt instead.

    The short requests are exactly ``random_workload``'s; a second generator seeded
    ``seed + 1`` picks which requests turn long and draws their prompts, so the
    long ones land at seeded positions in the arrival order. Output lengths stay W's.
    """
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction!r}")
    prompts, outputs = random_workload(num_prompts, input_len, output_len, seed, vocab)
    rng = random.Random(seed + 1)
    for i in sorted(rng.sample(range(num_prompts), round(long_fraction * num_prompts))):
        prompts[i] = [rng.randint(0, vocab) for _ in range(rng.randint(*long_input_len))]
    return prompts, outputs


def phased_workload(
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    long_input_len: tuple[int, int] = (4096, 8192),
    long_fraction: float = 0.1,
    seed: int = 0,
    vocab: int = 10000,
) -> tuple[list[list[int]], list[int]]:
    """A load that changes mid-run: the first half of the requests are W's (short prompts, short contexts),
    the second half ``mixed_workload``'s with ``long_fraction`` long prompts, whose decodes then read long
    contexts. A step budget counts tokens, not context, so one fixed budget cannot fit both halves."""
    first = num_prompts // 2
    prompts, outputs = random_workload(first, input_len, output_len, seed, vocab)
    late_prompts, late_outputs = mixed_workload(
        num_prompts - first, input_len, output_len, long_input_len, long_fraction, seed + 2, vocab
    )
    return prompts + late_prompts, outputs + late_outputs


# ``hf_overrides`` that give a ``random:`` model 4-bit codes in ``lm_head`` too, as a checkpoint's ``lm_head: true``
# (the random GPTQ layers' own settings: GPTQConfig's defaults)
LM_HEAD_OVERRIDES = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}}
_SWITCHES: dict[str, dict[str, Any]] = {  # M4's fast-path pieces, one at a time
    "sync": {"async_scheduling": False},
    "eager": {"enforce_eager": True},
    "unfused": {"fuse_kernels": False},
    "decode-graphs": {"cudagraph_mode": "FULL_DECODE_ONLY"},  # M5 with M4's graphs: mixed steps eager
    "compile": {"compilation_config": 3, "fuse_kernels": False},  # Inductor's fusion instead of ours
    "gptq": {"quantization": "gptq"},  # M7/gptq: GPTQ weights beside the same preset in bf16 (M7)
    "lm-head": {"quantization": "gptq", "hf_overrides": LM_HEAD_OVERRIDES},  # M7/gptq/lm-head: lm_head 4-bit too
}
_SETTINGS = {
    "block": ("block_size", int),
    "budget": ("max_num_batched_tokens", int),
    "threshold": ("long_prefill_token_threshold", int),
    "itl": ("target_itl_ms", float),
}  # the KV block size (M3/block=32) and M5's chunking knobs (M5/budget=512/itl=20)


def split_prompt_limit(spec: str) -> tuple[str, int | None]:
    """``"M2/static@32"`` -> ("M2/static", 32): the config and how many prompts of the workload it runs."""
    spec, _, limit = spec.partition("@")
    if limit and not limit.isdigit():
        raise ValueError(f"expected CONFIG@N with N a number of prompts, got {spec}@{limit}")
    return spec, int(limit) if limit else None


def parse_config(spec: str) -> tuple[str, dict[str, Any], int | None]:
    """``"M2/sequential@32"`` -> ("M2", {"batching": "sequential"}, 32): milestone, overrides, prompt limit.

    Each ``/variant`` is a batching mode, an attention backend (``M3/naive``), a KV block size
    (``M3/block=32``), a switch (``M4/sync``, ``M4/eager``, ``M4/unfused``: one of M4's fast-path
    pieces off; ``M4/compile``: Inductor instead of our fused kernels; ``M5/decode-graphs``: M4's
    graphs; ``M7/gptq``: GPTQ weights; ``M7/gptq/lm-head``: ``lm_head`` 4-bit too) or one of M5's chunking
    settings (``M5/budget=512``, ``M5/threshold=256``, ``M5/itl=20``: target ITL in ms).
    """
    spec, limit = split_prompt_limit(spec)
    milestone, *variants = spec.split("/")
    extra: dict[str, Any] = {}
    for variant in variants:
        key, eq, value = variant.partition("=")
        if eq and key in _SETTINGS:
            name, kind = _SETTINGS[key]
            try:
                extra[name] = kind(value)
            except ValueError:
                raise ValueError(f"config variant {key}= needs a number, got {value!r}") from None
        elif variant in _SWITCHES:
            extra.update(_SWITCHES[variant])
        elif variant in BATCHING_MODES or variant in ATTENTION_BACKENDS:
            extra["batching" if variant in BATCHING_MODES else "attention_backend"] = variant
        else:
            known = BATCHING_MODES + ATTENTION_BACKENDS + tuple(_SWITCHES) + tuple(f"{k}=N" for k in _SETTINGS)
            raise ValueError(f"unknown config variant {variant!r}: expected one of {known}")
    return milestone, extra, limit
