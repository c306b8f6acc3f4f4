"""The FastAPI app and its uvicorn server: ``folovllm serve``.

One process, two threads: uvicorn's event loop parses HTTP and streams responses;
``AsyncLLM``'s thread steps the engine. Every bad input is an HTTP 400 in OpenAI's
error format (FastAPI's default 422 is not what OpenAI clients expect). SIGTERM or
Ctrl-C: uvicorn stops accepting connections, lets running responses finish, then
the engine loop stops.
"""

from __future__ import annotations

import signal
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from folovllm.engine.async_llm import AsyncLLM
from folovllm.entrypoints.openai.basic.api_router import router as basic_router
from folovllm.entrypoints.openai.chat_completion.api_router import router as chat_router
from folovllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from folovllm.entrypoints.openai.completion.api_router import router as completion_router
from folovllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from folovllm.entrypoints.openai.metrics import ServerMetrics
from folovllm.entrypoints.openai.models.api_router import router as models_router
from folovllm.entrypoints.openai.models.serving import OpenAIServingModels
from folovllm.entrypoints.openai.protocol import APIError, ErrorInfo, ErrorResponse


def build_app(engine: AsyncLLM, served_model_name: str | None = None) -> FastAPI:
    """The app around a running ``AsyncLLM``; clients call the model ``served_model_name``."""
    app = FastAPI(title="FoloVLLM", description="OpenAI-compatible server of a teaching vLLM")
    models = OpenAIServingModels(served_model_name or engine.model_name, engine.model_name, engine.max_model_len)
    metrics = ServerMetrics(engine)
    state = app.state
    state.engine, state.metrics, state.openai_serving_models = engine, metrics, models
    state.openai_serving_completion = OpenAIServingCompletion(engine, models, metrics)
    state.openai_serving_chat = OpenAIServingChat(engine, models, metrics)
    for router in (basic_router, models_router, completion_router, chat_router):
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON, a wrong type, a missing or unknown field: 400, ``param`` = the top-level field."""
    err = exc.errors()[0]
    path = [p for p in err["loc"] if p != "body"]
    param = str(path[0]) if path else None
    where = ".".join(str(p) for p in path)
    if err["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where}"
    elif err["type"] == "json_invalid":  # its loc is a character position, not a field
        param = None
        message = f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
    else:
        message = f"{where}: {err['msg']}" if where else f"request body: {err['msg']}"
    return _error(400, message, param=param)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status_code)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"{type(exc).__name__}: {exc}", type="internal_error")


def run_server(
    engine: AsyncLLM,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM/SIGINT; running responses finish first (uvicorn's graceful shutdown)."""
    server = uvicorn.Server(uvicorn.Config(build_app(engine, served_model_name), host=host, port=port, log_level=log_level))
    # Once drained, uvicorn raises the signal that stopped it again, for the handler that was there
    # before: make that handler a no-op so ``run`` returns, the engine loop stops, and the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        engine.shutdown(drain=False)


class ServerThread:
    """The server on a background thread, for notebooks and tests: ``with ServerThread(engine) as s: s.url``.

    ``port=0`` takes a free port. The engine stays the caller's: stopping the server does not stop it.
    """

    def __init__(
        self,
        engine: AsyncLLM,
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str | None = None,
        log_level: str = "warning",
    ) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(build_app(engine, served_model_name), host=host, port=port, log_level=log_level)
        )
        self.thread = threading.Thread(target=self.server.run, name="folovllm-server", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
