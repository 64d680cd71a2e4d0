"""Per-request context: the request id, the start time, and what every response carries.

* **Request id.** Every response has an ``X-Request-Id`` header (errors and 404s included). A client may send its
  own ``X-Request-Id`` to correlate logs: it is kept if it is a short safe token (1-64 of ``A-Z a-z 0-9 . _ : -``,
  starting with a letter or digit), otherwise a fresh ``req-<12 hex>`` is used. The id appears in the server's log
  lines about the request, and the engine's lines carry it too (:func:`synthesis_id`: a client-chosen id gets a
  short suffix there, since two clients may choose the same one). Request text and audio are
  never logged; only ids, routes, statuses, sizes and timings.
* **Start time.** Recorded when the request reaches its route (before the body is read), for time-to-first-audio
  and the per-request time budget.
* :func:`on_response_start` (a Litestar ``before_send`` hook) adds the header, counts the response in the app's
  metrics and writes one log line for failed requests.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = (
    "REQUEST_ID_HEADER",
    "is_safe_request_id",
    "new_request_id",
    "on_response_start",
    "request_context_middleware",
    "request_id",
    "request_started",
    "synthesis_id",
)

logger = logging.getLogger("flashtts_core.server.access")

REQUEST_ID_HEADER = "X-Request-Id"
_HEADER_KEY = b"x-request-id"
_ID_KEY = "flashtts.request_id"
_START_KEY = "flashtts.started"
_OURS_KEY = "flashtts.request_id_generated"
_SYNTHESIS_KEY = "flashtts.synthesis_id"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def new_request_id() -> str:
    """A short random id (48 bits)."""
    return f"req-{secrets.token_hex(6)}"


def is_safe_request_id(value: str) -> bool:
    return _SAFE_ID.fullmatch(value) is not None


def _incoming_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == _HEADER_KEY:
            try:
                text = value.decode("ascii").strip()
            except UnicodeDecodeError:
                return None
            return text if is_safe_request_id(text) else None
    return None


def request_id(scope: Scope | Any) -> str:
    """The request's id (the client's if it is safe, else a new one); the same on every call for one request.

    ``scope`` is an ASGI scope or anything with a ``scope`` attribute (a Litestar ``Request``)."""
    scope = getattr(scope, "scope", scope)
    state = scope.setdefault("state", {})
    rid: str | None = state.get(_ID_KEY)
    if rid is None:
        rid = _incoming_id(scope)
        if rid is None:
            rid = new_request_id()
            state[_OURS_KEY] = True
        state[_ID_KEY] = rid
    return rid


def synthesis_id(scope: Scope | Any) -> str:
    """The id handed to the engine and backend: the request id, made unique when the client chose it (two
    clients may send the same id; backends key their sequences by it), so it always *starts with* the id the
    client sees in ``X-Request-Id``."""
    scope = getattr(scope, "scope", scope)
    rid = request_id(scope)
    state = scope["state"]
    sid: str | None = state.get(_SYNTHESIS_KEY)
    if sid is None:
        sid = rid if state.get(_OURS_KEY) else f"{rid}.{secrets.token_hex(3)}"
        state[_SYNTHESIS_KEY] = sid
    return sid


def request_started(scope: Scope | Any) -> float:
    """``time.monotonic()`` when the request reached its route (now, if it was not recorded)."""
    scope = getattr(scope, "scope", scope)
    state = scope.setdefault("state", {})
    started: float | None = state.get(_START_KEY)
    if started is None:
        started = state[_START_KEY] = time.monotonic()
    return started


def request_context_middleware(app: ASGIApp) -> ASGIApp:
    """Litestar middleware: records the start time and settles the request id before guards and handlers."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request_started(scope)
            request_id(scope)
        await app(scope, receive, send)

    return middleware


async def on_response_start(message: Message, scope: Scope) -> None:
    """``before_send`` hook: ``X-Request-Id`` on every HTTP response, metrics, a log line for failures."""
    if message["type"] != "http.response.start" or scope.get("type") != "http":
        return
    rid = request_id(scope)
    headers = list(message.get("headers") or ())
    if not any(key.lower() == _HEADER_KEY for key, _ in headers):
        headers.append((_HEADER_KEY, rid.encode("ascii")))
        message["headers"] = headers  # type: ignore[typeddict-unknown-key]
    status = int(message["status"])
    method = scope.get("method", "GET")
    route = scope.get("path_template") if "route_handler" in scope else None
    started = scope.get("state", {}).get(_START_KEY)
    seconds = time.monotonic() - started if started is not None else None
    app = scope.get("app")
    server = getattr(getattr(app, "state", None), "server", None) if app is not None else None
    metrics = getattr(server, "metrics", None)
    if metrics is not None:
        metrics.observe_response(route, method, status, seconds)
    if status >= 400:
        level = logging.WARNING if status >= 500 and status != 503 else logging.INFO
        took = f" after {seconds * 1000:.0f} ms" if seconds is not None else ""
        logger.log(level, "request %s: %s %s -> %d%s", rid, method, route or "(no route)", status, took)
    elif logger.isEnabledFor(logging.DEBUG):
        took = f" after {seconds * 1000:.0f} ms" if seconds is not None else ""
        logger.debug("request %s: %s %s -> %d%s", rid, method, route, status, took)
