"""``GET /v1/models``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from folovllm.entrypoints.openai.models.protocol import ModelList

router = APIRouter()


@router.get("/v1/models")
async def show_available_models(raw_request: Request) -> ModelList:
    return raw_request.app.state.openai_serving_models.list()
