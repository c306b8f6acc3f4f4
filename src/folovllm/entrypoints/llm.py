"""``LLM``: vLLM's offline API on top of ``LLMEngine``."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Sequence

import torch
from tqdm import tqdm

from folovllm.config import EngineConfig
from folovllm.engine.llm_engine import LLMEngine, PromptType
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generate with our engine as of any chapter.

    ``LLM("smollm2-135m", milestone="M2", max_model_len=512)`` runs the engine
    as it stood after chapter M2; ``milestone=None`` turns on everything built.
    Extra keyword arguments are ``EngineConfig`` field names.
    """

    def __init__(self, model: str = "smollm2-135m", *, milestone: str | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None, seed: int = 0,
                 **engine_overrides: Any) -> None:
        config = EngineConfig.from_milestone(milestone, model=model, device=device or "auto",
                                             dtype=dtype or "auto", seed=seed, **engine_overrides)
        torch.manual_seed(seed)
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in input order.

        Every prompt is validated before any is queued, so a bad one raises a
        ``ValueError`` and leaves the engine exactly as it was.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        engine = self.llm_engine
        params = [_final_only(sp) for sp in params]
        processed = [engine.process_inputs(p, sp) for p, sp in zip(prompts, params)]
        ids = [str(next(self._counter)) for _ in prompts]
        for rid, proc, prio in zip(ids, processed, priority):
            engine.add_processed_request(rid, *proc, priority=prio)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in ids]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's name); e.g. between benchmark runs. False while requests run."""
        return self.llm_engine.reset_prefix_cache()


def _final_only(params: SamplingParams | None) -> SamplingParams:
    """``generate`` returns finished requests only, so the engine need not build an output per step."""
    return replace(params or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY)
