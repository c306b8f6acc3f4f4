"""``POST /v1/chat/completions``: JSON, or server-sent events when ``stream`` is true."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from folovllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from folovllm.entrypoints.openai.serving_engine import until_disconnected

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.openai_serving_chat
    if request.stream:
        return StreamingResponse(await handler.create_chat_completion(request), media_type="text/event-stream")
    result = await until_disconnected(raw_request, handler.create_chat_completion(request))
    return JSONResponse(result.model_dump()) if result is not None else Response(status_code=499)
