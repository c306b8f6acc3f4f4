"""``GET /v1/models`` schemas (OpenAI's, plus vLLM's ``max_model_len``)."""

from __future__ import annotations

from typing import Literal

from folovllm.entrypoints.openai.protocol import OpenAIBaseModel


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "folovllm"
    root: str
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
