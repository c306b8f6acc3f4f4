"""``POST /v1/completions``: JSON, or server-sent events when ``stream`` is true."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from folovllm.entrypoints.openai.completion.protocol import CompletionRequest
from folovllm.entrypoints.openai.serving_engine import until_disconnected

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.openai_serving_completion
    if request.stream:
        return StreamingResponse(await handler.create_completion(request), media_type="text/event-stream")
    result = await until_disconnected(raw_request, handler.create_completion(request))
    return JSONResponse(result.model_dump()) if result is not None else Response(status_code=499)
