"""Public routes: the web page, liveness/readiness probes and the API documentation; and ``/metrics``.

None of the public ones needs ``--api_key``: a browser cannot attach an ``Authorization`` header when it navigates
to the page, and probes/orchestrators should not need the key either. They reveal no voice or request data.

``/metrics`` (Prometheus text format) needs the key when one is set, unless ``--metrics_public``: it tells how
busy the server is and which routes are used, which is not for everyone, while a scraper can send the key
(``authorization`` in Prometheus' scrape config) or the operator can expose it deliberately.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.enums import MediaType
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import File

from flashtts_core.errors import NotFoundError
from flashtts_core.server.auth import require_api_key
from flashtts_core.server.errors import error_response
from flashtts_core.server.metrics import CONTENT_TYPE
from flashtts_core.server.schemas import ErrorBody, HealthResponse, ReadyResponse
from flashtts_core.server.state import server_state

__all__ = ("STATIC_DIR", "favicon", "health", "index", "metrics", "openapi_json", "ready")

logger = logging.getLogger(__name__)

# Package-relative: Litestar resolves static directories against the working directory otherwise.
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@get("/health", summary="Liveness: 200 while the process runs", tags=["System"], sync_to_thread=False)
def health() -> HealthResponse:
    return HealthResponse(status="ok")


@get(
    "/ready",
    summary="Readiness: 200 once the model is loaded and warmed up, else 503",
    tags=["System"],
    responses={
        503: ResponseSpec(ErrorBody, generate_examples=False, description="Model not loaded (yet), or failed to load")
    },
)
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    state = server_state(request)
    runtime = state.runtime
    if runtime is None:
        message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        return error_response(503, message, "server_error", None, "not_ready", **{"Retry-After": "5"})
    backend_health = await runtime.backend.health()
    if backend_health.status != "ready" or not runtime.engine.ready:
        detail = f": {backend_health.detail}" if backend_health.detail else ""
        message = f"the backend is {backend_health.status}{detail}"
        return error_response(503, message, "server_error", None, "not_ready", **{"Retry-After": "5"})
    body = ReadyResponse(
        status="ready",
        model=runtime.model_name,
        backend=runtime.backend.name,
        running=backend_health.running,
        waiting=backend_health.waiting,
        active_requests=runtime.service.active_requests,
    )
    return Response(body, status_code=200)


@get("/", include_in_schema=False, sync_to_thread=False)
def index() -> File:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise NotFoundError("the web page is not installed; the API is documented at /docs", code="not_found")
    return File(page, media_type=MediaType.HTML, content_disposition_type="inline")


@get("/favicon.ico", include_in_schema=False, sync_to_thread=False)
def favicon() -> File:
    for name, media_type in (("favicon.ico", "image/x-icon"), ("favicon.svg", "image/svg+xml")):
        path = STATIC_DIR / name
        if path.is_file():
            return File(path, media_type=media_type, content_disposition_type="inline")
    raise NotFoundError("no favicon", code="not_found")


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    schema = request.app.openapi_schema.to_schema()
    return Response(msgspec.json.encode(schema), media_type="application/vnd.oai.openapi+json")


def _metrics_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    if not connection.app.state.server.settings.metrics_public:
        require_api_key(connection, handler)


@get(
    "/metrics",
    summary="Prometheus metrics (needs the API key when one is set, unless --metrics_public)",
    tags=["System"],
    guards=[_metrics_guard],
    media_type=CONTENT_TYPE,
    responses={401: ResponseSpec(ErrorBody, generate_examples=False, description="Missing or wrong API key")},
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    state = server_state(request)
    if state.metrics is None:
        raise NotFoundError("metrics are off", code="not_found")
    return Response(await state.metrics.render(state.runtime), media_type=CONTENT_TYPE)
