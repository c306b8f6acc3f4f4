"""The one model this server runs, under the name clients must use."""

from __future__ import annotations

from folovllm.entrypoints.openai.models.protocol import ModelCard, ModelList
from folovllm.entrypoints.openai.protocol import APIError, now


class OpenAIServingModels:
    def __init__(self, served_model_name: str, root: str, max_model_len: int) -> None:
        self.served_model_name = served_model_name
        self.card = ModelCard(id=served_model_name, created=now(), root=root, max_model_len=max_model_len)

    def check(self, name: str | None) -> None:
        """``None`` means this server's model (as vLLM allows); another name is OpenAI's 404."""
        if name is not None and name != self.served_model_name:
            raise APIError(
                f"The model `{name}` does not exist; this server runs `{self.served_model_name}`.",
                status_code=404,
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def list(self) -> ModelList:
        return ModelList(data=[self.card])
