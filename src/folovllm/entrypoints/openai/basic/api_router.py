"""``GET /health`` (200 while the engine loop runs, 503 after) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/health")
async def health(raw_request: Request) -> Response:
    return Response(status_code=200 if raw_request.app.state.engine.is_running else 503)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    return Response(await raw_request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
