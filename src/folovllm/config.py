"""Engine configuration: four small dataclasses and the milestone presets.

Every field is validated in ``__post_init__`` so a bad value fails with a
``ValueError`` naming the field before any weights are touched. Configs hold
names only: which attention backend a name means here is decided in
``attention/selector.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from folovllm.exceptions import InvalidTypeError

MILESTONES = ("M0", "M1", "M2", "M3", "M4", "M5", "M6", "M7")
BUILT_MILESTONES = ("M0", "M1", "M2", "M3", "M4", "M5", "M6", "M7")
ATTENTION_BACKENDS = ("auto", "naive", "triton", "flash_attn")
BATCHING_MODES = ("sequential", "static", "continuous")
KV_LAYOUTS = ("none", "contiguous", "paged")
POLICIES = ("fcfs", "priority")
QUANTIZATION_METHODS = ("gptq",)
CUDAGRAPH_MODES = ("FULL_DECODE_ONLY", "FULL")
COMPILATION_LEVELS = (0, 3)  # vLLM's levels: 0 = no torch.compile, 3 = Inductor, split at attention
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" is fp32 on CPU (exact HF comparison) and bf16 on GPU."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    """Which weights to run and at what precision.

    ``model`` is a local HF folder, ``"smollm2-135m"`` (the embedded model) or
    ``"random:<preset>"`` (a real architecture with seeded random weights).
    On a GPU, ``fuse_kernels`` runs the decoder's glue (norms, activation, RoPE) as
    fused Triton kernels and, unless ``enforce_eager`` (vLLM's name), steps replay
    CUDA graphs: decode steps only with ``cudagraph_mode="FULL_DECODE_ONLY"`` (M4),
    every step of up to ``max_cudagraph_capture_size`` tokens with ``"FULL"`` (M5:
    prefill chunks and mixed steps too; vLLM's names). On CPU all are ignored.
    ``compilation_config`` (vLLM's name, its integer levels): 3 compiles the decoder
    with ``torch.compile`` (Inductor), split at attention, the alternative to
    ``fuse_kernels`` that M4 part 2 measures; 0 (default) does not compile.
    ``max_logprobs`` caps ``SamplingParams.logprobs`` (vLLM's default, the
    OpenAI API's limit; -1 = the whole vocabulary).

    ``quantization`` (vLLM's name): None reads the checkpoint's ``quantization_config``
    (from M7 on); "gptq" insists on GPTQ weights (random ones for ``random:`` models).
    ``hf_overrides`` (vLLM's name): fields set on the HF config after it is read, e.g.
    ``{"quantization_config": {...}}`` for a ``random:`` model quantized as a checkpoint would say.
    """

    model: str = "smollm2-135m"
    dtype: str | torch.dtype | None = "auto"
    device: str | torch.device | None = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False
    fuse_kernels: bool = True
    cudagraph_mode: str = "FULL"
    max_cudagraph_capture_size: int = 2048
    compilation_config: int = 0
    max_logprobs: int = 20
    quantization: str | None = None
    hf_overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in ("enforce_eager", "fuse_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cudagraph_mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {CUDAGRAPH_MODES}, got {self.cudagraph_mode!r}")
        _positive("max_cudagraph_capture_size", self.max_cudagraph_capture_size)
        if self.compilation_config not in COMPILATION_LEVELS or isinstance(self.compilation_config, bool):
            raise ValueError(
                f"compilation_config must be one of {COMPILATION_LEVELS} (3: torch.compile), got {self.compilation_config!r}"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {self.quantization!r}")
        overrides = self.hf_overrides
        if overrides is not None and (not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides)):
            raise InvalidTypeError(f"hf_overrides must be a dict of HF config field names to values, got {overrides!r}")
        _positive("max_model_len", self.max_model_len, allow_none=True)
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool):
            raise InvalidTypeError(
                f"max_logprobs must be an integer >= -1 (-1: the whole vocabulary), got {self.max_logprobs!r}"
            )
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= -1 (-1: the whole vocabulary), got {self.max_logprobs!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidTypeError(f"seed must be an integer, got {self.seed!r}")
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)


@dataclass
class CacheConfig:
    """How KV memory is laid out and how much of it there is.

    ``kv_layout``: "none" recomputes the whole sequence every step (M0),
    "contiguous" reserves a ``max_model_len`` slab per request (M1/M2),
    "paged" hands out ``block_size``-token blocks on demand (M3+).
    ``kv_cache_memory`` (bytes) fixes the budget; otherwise CPU uses
    ``DEFAULT_CPU_KV_BYTES`` and GPU profiles the card and takes
    ``gpu_memory_utilization`` of it. ``enable_cow`` (copy-on-write sharing of
    an ``n > 1`` request's prompt blocks) defaults to on wherever the layout is paged.
    ``enable_prefix_caching`` (vLLM's name, M6) keeps freed full blocks by the hash
    of the prefix they hold and starts new requests after the longest cached prefix.
    """

    kv_layout: str = "paged"
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_cow: bool | None = None
    enable_prefix_caching: bool = False

    DEFAULT_CPU_KV_BYTES = 512 * 1024**2

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        _positive("block_size", self.block_size)
        _positive("kv_cache_memory", self.kv_cache_memory, allow_none=True)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.enable_cow is None:
            self.enable_cow = self.kv_layout == "paged"
        elif self.enable_cow and self.kv_layout != "paged":
            raise ValueError(f"enable_cow=True needs kv_layout='paged', got {self.kv_layout!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.enable_prefix_caching and self.kv_layout != "paged":
            raise ValueError(f"enable_prefix_caching=True needs kv_layout='paged', got {self.kv_layout!r}")


@dataclass
class SchedulerConfig:
    """How many requests and tokens one step may carry, and who goes first.

    ``max_num_batched_tokens`` defaults to ``max(8192, max_model_len)`` once the
    model is known: without chunked prefill a whole prompt must fit one step.
    ``enable_chunked_prefill`` (vLLM's name, M5) lets a prompt be cut into chunks
    across steps, so the budget may be far below ``max_model_len``;
    ``long_prefill_token_threshold`` (vLLM's name; 0 = no cap) caps one request's
    chunk so several prompts progress together. ``target_itl_ms`` turns on dynamic
    chunk sizing: each step's prefill share is cut so the step's time, predicted by a
    cost model fitted on the steps measured so far, stays under this inter-token
    latency (``max_num_batched_tokens`` stays the ceiling; decodes are never cut).

    ``batching``: "sequential" runs one request at a time (M1), "static" forms
    a batch of up to ``max_num_seqs`` requests (prefilled over as many steps as
    the token budget needs, none decoding meanwhile), runs it until every member
    has finished, then forms the next, as a static server does; "continuous"
    admits and retires requests between any two steps (M2+). ``cuda_graph_sizes``
    (vLLM's name) lists the decode batch sizes captured as CUDA graphs (default:
    1, 2, 4, then every 8 up to ``max_num_seqs``). ``async_scheduling`` (vLLM's
    name) schedules and launches step n+1 before step n's tokens reach the host,
    so host work overlaps the GPU's; it needs continuous batching.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    batching: str = "continuous"
    policy: str = "fcfs"
    cuda_graph_sizes: list[int] | None = None
    async_scheduling: bool = False
    enable_chunked_prefill: bool = False
    long_prefill_token_threshold: int = 0
    target_itl_ms: float | None = None

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        if self.cuda_graph_sizes is not None:
            if not isinstance(self.cuda_graph_sizes, (list, tuple)) or not self.cuda_graph_sizes:
                raise ValueError(
                    f"cuda_graph_sizes must be a non-empty list of positive integers, got {self.cuda_graph_sizes!r}"
                )
            for size in self.cuda_graph_sizes:
                _positive("cuda_graph_sizes entry", size)
            self.cuda_graph_sizes = sorted(set(self.cuda_graph_sizes))
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if self.async_scheduling and self.batching != "continuous":
            raise ValueError(f"async_scheduling needs batching='continuous', got {self.batching!r}")
        self._check_chunking()

    def _check_chunking(self) -> None:
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be a non-negative integer, got {threshold!r}")
        target = self.target_itl_ms
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0):
            raise ValueError(f"target_itl_ms must be a positive number of milliseconds, got {target!r}")
        for name, on in (("long_prefill_token_threshold", threshold), ("target_itl_ms", target)):
            if on and not self.enable_chunked_prefill:
                raise ValueError(f"{name} needs enable_chunked_prefill=True")
        if self.enable_chunked_prefill and self.batching != "continuous":
            raise ValueError(f"enable_chunked_prefill needs batching='continuous', got {self.batching!r}")


@dataclass
class EngineConfig:
    """Everything the engine needs; ``milestone`` records which preset built it.

    ``collect_step_stats`` keeps a ``StepStats`` record per step (the last
    ``STEP_STATS_LIMIT``), for chapters and benchmarks; ``kv_usage_interval`` > 0
    also snapshots KV usage every that many steps. Both cost host time per step,
    so a long-running engine leaves them off.
    """

    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"
    milestone: str | None = None
    collect_step_stats: bool = False
    kv_usage_interval: int = 0

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.milestone is not None and self.milestone not in MILESTONES:
            raise ValueError(f"milestone must be one of {MILESTONES} or None, got {self.milestone!r}")
        if not isinstance(self.collect_step_stats, bool):
            raise InvalidTypeError(f"collect_step_stats must be a bool, got {self.collect_step_stats!r}")
        if not isinstance(self.kv_usage_interval, int) or isinstance(self.kv_usage_interval, bool):
            raise InvalidTypeError(f"kv_usage_interval must be a non-negative integer, got {self.kv_usage_interval!r}")
        if self.kv_usage_interval < 0:
            raise ValueError(f"kv_usage_interval must be a non-negative integer, got {self.kv_usage_interval!r}")
        if self.scheduler_config.async_scheduling and self.cache_config.kv_layout == "none":
            raise ValueError("async_scheduling needs a KV cache (kv_layout 'contiguous' or 'paged'), got 'none'")

    @property
    def device(self) -> torch.device:
        return self.model_config.device  # type: ignore[return-value]

    def includes(self, milestone: str) -> bool:
        """Whether this engine has the features of chapter ``milestone`` (None = every built one)."""
        as_of = self.milestone or BUILT_MILESTONES[-1]
        return MILESTONES.index(as_of) >= MILESTONES.index(milestone)

    @classmethod
    def from_milestone(cls, milestone: str | None = None, model: str = "smollm2-135m", **overrides: Any) -> "EngineConfig":
        """The engine as of chapter ``milestone`` (None = every built feature on).

        ``overrides`` are field names of any of the four configs, e.g.
        ``max_model_len=512`` or ``kv_cache_memory=2**26``.
        """
        if milestone is not None and milestone not in MILESTONES:
            raise ValueError(f"milestone must be one of {MILESTONES} or None, got {milestone!r}")
        if milestone is not None and milestone not in BUILT_MILESTONES:
            raise ValueError(f"milestone {milestone} is not built yet; built milestones are {BUILT_MILESTONES}")
        preset = _MILESTONE_PRESETS[milestone or BUILT_MILESTONES[-1]]
        parts: dict[str, dict[str, Any]] = {
            "model": {"model": model},
            "cache": {},
            "scheduler": {},
            "engine": {"milestone": milestone},
        }
        for key, value in {**preset, **overrides}.items():
            parts[_owner_of(key)][key] = value
        return cls(
            model_config=ModelConfig(**parts["model"]),
            cache_config=CacheConfig(**parts["cache"]),
            scheduler_config=SchedulerConfig(**parts["scheduler"]),
            **parts["engine"],
        )

    def replace(self, **overrides: Any) -> "EngineConfig":
        """A copy with some fields changed (same field names as ``from_milestone``)."""
        parts = {"model": {}, "cache": {}, "scheduler": {}, "engine": {}}
        for key, value in overrides.items():
            parts[_owner_of(key)][key] = value
        return replace(
            self,
            model_config=replace(self.model_config, **parts["model"]),
            cache_config=replace(self.cache_config, **parts["cache"]),
            scheduler_config=replace(self.scheduler_config, **parts["scheduler"]),
            **parts["engine"],
        )


_OWNERS = {
    "model": {f.name for f in fields(ModelConfig)},
    "cache": {f.name for f in fields(CacheConfig)},
    "scheduler": {f.name for f in fields(SchedulerConfig)},
    "engine": {f.name for f in fields(EngineConfig) if not f.name.endswith("_config")},
}


def _owner_of(key: str) -> str:
    for owner, names in _OWNERS.items():
        if key in names:
            return owner
    known = sorted(set().union(*_OWNERS.values()))
    raise ValueError(f"unknown engine option {key!r}; known options: {known}")


# region milestone presets
# What each chapter switches on. Later presets extend earlier ones.
_EAGER = {"enforce_eager": True, "fuse_kernels": False}
_MILESTONE_PRESETS: dict[str, dict[str, Any]] = {
    "M0": {"kv_layout": "none", "batching": "sequential", "attention_backend": "naive", **_EAGER},
    "M1": {"kv_layout": "contiguous", "batching": "sequential", "attention_backend": "naive", **_EAGER},
    "M2": {"kv_layout": "contiguous", "batching": "continuous", "attention_backend": "naive", **_EAGER},
    "M3": {"kv_layout": "paged", "batching": "continuous", "attention_backend": "auto", **_EAGER},
    "M4": {
        "kv_layout": "paged",
        "batching": "continuous",
        "attention_backend": "auto",
        "enforce_eager": False,
        "fuse_kernels": True,
        "cudagraph_mode": "FULL_DECODE_ONLY",
        "async_scheduling": True,
    },
}
# M5's steps mix prompt chunks with decodes, so they are captured too (a step is at most the budget).
# The budget, 512, is the knee of the H200 sweep (milestones/M5.md): p99 ITL 4x below M4's at M4's throughput.
_MILESTONE_PRESETS["M5"] = {
    **_MILESTONE_PRESETS["M4"],
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 512,
    "cudagraph_mode": "FULL",
}
_MILESTONE_PRESETS["M6"] = {**_MILESTONE_PRESETS["M5"], "enable_prefix_caching": True}
# M7 = M6 + quantized weights, read from the checkpoint (``EngineConfig.includes("M7")``).
_MILESTONE_PRESETS["M7"] = dict(_MILESTONE_PRESETS["M6"])
# endregion
