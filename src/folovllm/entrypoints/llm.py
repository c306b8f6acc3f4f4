"""``LLM``: vLLM's offline API on top of ``LLMEngine``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from folovllm.config import EngineConfig
from folovllm.engine.llm_engine import LLMEngine, PromptType
from folovllm.exceptions import InvalidTypeError
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import INT64_MIN, RequestOutputKind, SamplingParams, check_int


class LLM:
    """Generate with our engine as of any chapter.

    ``LLM("smollm2-135m", milestone="M2", max_model_len=512)`` runs the engine
    as it stood after chapter M2; ``milestone=None`` turns on everything built.
    Extra keyword arguments are ``EngineConfig`` field names.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        milestone: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        **engine_overrides: Any,
    ) -> None:
        config = EngineConfig.from_milestone(
            milestone, model=model, device=device or "auto", dtype=dtype or "auto", seed=seed, **engine_overrides
        )
        torch.manual_seed(seed)
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` for text prompts and output text (vLLM's API), e.g. for a model that has none."""
        self.llm_engine.tokenizer = tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams | None] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in input order.

        The whole batch is validated before any of it is queued, so a bad prompt
        or parameter raises ``ValueError`` and leaves the engine exactly as it was.
        ``generate`` runs the engine until *its* requests finish, so it refuses
        (``RuntimeError``) to start while the engine holds requests someone added
        through ``LLMEngine.add_request``: it would run them and drop their outputs.
        If the run itself fails (or is interrupted), the batch's unfinished
        requests are aborted, so the next call starts from a clean engine.
        """
        engine = self.llm_engine
        if engine.has_unfinished_requests():
            pending = list(engine.parents)
            raise RuntimeError(
                f"the engine holds {len(pending)} unfinished request(s) added through LLMEngine.add_request "
                f"({', '.join(map(repr, pending[:3]))}{', ...' if len(pending) > 3 else ''}); LLM.generate would "
                "run them and drop their outputs: step the engine until they finish, or abort them, first"
            )
        prompts = _as_list("prompts", prompts, (str, dict), "a prompt (str or dict) or a list of them")
        if not prompts:
            raise ValueError("prompts must not be empty")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = _as_list("sampling_params", sampling_params, (), "a SamplingParams, None or a list of them")
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else _as_list("priority", priority, (), "a list of integers")
        if len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        processed = [engine.process_inputs(p, sp) for p, sp in zip(prompts, params)]
        for inputs in processed:  # generate returns finished requests only: no output built per step
            inputs.sampling_params = replace(inputs.sampling_params, output_kind=RequestOutputKind.FINAL_ONLY)
        priority = [check_int(f"priority[{i}]", p, INT64_MIN) for i, p in enumerate(priority)]
        ids = [str(next(self._counter)) for _ in prompts]
        finished: dict[str, RequestOutput] = {}
        try:
            for rid, inputs, prio in zip(ids, processed, priority):
                engine.add_processed_request(rid, inputs, prio)
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        return [finished[rid] for rid in ids]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's name); e.g. between benchmark runs. False while requests run."""
        return self.llm_engine.reset_prefix_cache()


def _as_list(name: str, value: Any, single: tuple[type, ...], what: str) -> list[Any]:
    """``value`` as a list: a lone ``single`` item is wrapped; anything but a list or tuple is refused."""
    if single and isinstance(value, single):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidTypeError(f"{name} must be {what}, got {type(value).__name__}")
    return list(value)
