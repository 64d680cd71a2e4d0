"""The one exception handler of the app: every error becomes ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients (and our web page) read exactly this envelope, so it is used for *every* failure, including the
ones Litestar raises itself (validation, unknown route, wrong method, body too large). Unexpected exceptions are
logged with their traceback and answered with a generic 500 that leaks nothing about the internals.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from flashtts_core.errors import (
    AuthenticationError,
    BackendNotReadyError,
    FlashTTSError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
)
from flashtts_core.server.context import request_id

__all__ = ("ModelNotFoundError", "error_response", "handle_exception", "param_from_message", "validation_error")

logger = logging.getLogger(__name__)

# msgspec reports a missing field as key "data" with the name only in the message.
_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`")
# "... - at `$.voice.id`" (msgspec paths inside nested values).
_PATH_IN_MESSAGE = re.compile(r"at `\$\.?([^`]*)`")
_PATH_SUFFIX = re.compile(r" - at `\$[^`]*`$")


class ModelNotFoundError(NotFoundError):
    """Unknown ``model`` on the OpenAI route (OpenAI answers 404 ``model_not_found``)."""

    error_type = "invalid_request_error"
    default_code = "model_not_found"


def _envelope(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None, **headers: str
) -> Response[dict[str, Any]]:
    """A JSON error response in the envelope (also used outside the handler, e.g. by ``/ready``)."""
    return Response(_envelope(message, type_, param, code), status_code=status, headers=headers or None)


def param_from_message(message: str) -> str | None:
    """The field a msgspec error message names (``field `x``` or ``at `$.x```), if any."""
    match = _FIELD_IN_MESSAGE.search(message) or _PATH_IN_MESSAGE.search(message)
    return match.group(1) if match and match.group(1) else None


def validation_error(message: str, param: str | None = None) -> InvalidRequestError:
    """A 400 for a schema violation, worded for humans: "Invalid value for 'speed': Expected ..."."""
    param = param or param_from_message(message)
    if param and "missing required field" in message:
        return InvalidRequestError(f"'{param}' is required", param=param, code="missing_field")
    text = _PATH_SUFFIX.sub("", message)
    if param:
        return InvalidRequestError(f"Invalid value for '{param}': {text}", param=param, code="invalid_value")
    return InvalidRequestError(text, code="invalid_value")


def _first_invalid(exc: ValidationException) -> tuple[str | None, str]:
    """(key, message) of the first invalid field of a Litestar validation error (msgspec stops at the first)."""
    extra = exc.extra
    first: dict[str, Any] | None = None
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
    elif isinstance(extra, dict):
        first = extra
    if first is None:
        return None, str(exc.detail)
    key = first.get("key")
    # Litestar names the whole body "data" when a field is missing; the field is then only in the message.
    return (str(key) if key and key != "data" else None), str(first.get("message") or exc.detail)


# How msgspec words a JSON body with NaN/Infinity literals (not JSON) or a number beyond float range.
_BAD_NUMBER = ("JSON is malformed", "Number out of range")


class _Constant:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _non_finite_field(request: Request[Any, Any, Any]) -> tuple[str, str] | None:
    """(field, literal) when a JSON body was refused for a ``NaN``/``Infinity`` literal (not JSON, but what
    Python's and JavaScript's serialisers write for non-finite numbers) or a number like ``1e999``, so the error
    can name the field."""
    state = getattr(request, "_connection_state", None)
    body = getattr(state, "body", None)
    if not isinstance(body, bytes) or not body or len(body) > 1_000_000:
        return None

    def number(text: str) -> float | _Constant:
        value = float(text)
        return value if math.isfinite(value) else _Constant(text)

    try:
        data = json.loads(body, parse_constant=_Constant, parse_float=number)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, _Constant):
                return str(key), value.name
    return None


def _http_error(exc: HTTPException, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status == 400 and str(exc.detail).startswith(_BAD_NUMBER) and (found := _non_finite_field(request)):
        field, literal = found
        error = InvalidRequestError(
            f"Invalid value for '{field}': {literal} is not a finite number; send a number within the documented range",
            param=field,
            code="invalid_value",
        )
        return Response(error.to_dict(), status_code=400)
    if status == 400 and exc.detail == "Request Entity Too Large" and not exc.extra:
        # Litestar's answer to a multipart form with more parts than multipart_form_part_limit.
        limit = request.app.multipart_form_part_limit
        return error_response(
            413,
            f"the form has more than {limit} parts; send only the documented fields",
            "invalid_request_error",
            None,
            "too_many_parts",
        )
    if isinstance(exc, ValidationException) or (status == 400 and exc.extra):
        key, message = _first_invalid(exc)  # type: ignore[arg-type]
        error = validation_error(message, key)
        return Response(error.to_dict(), status_code=400)
    if status == 404:
        return error_response(
            404, f"no route {request.method} {request.url.path}; see /docs", "not_found_error", None, "not_found"
        )
    if status == 405:
        return error_response(
            405,
            f"{request.method} is not allowed on {request.url.path}; see /docs",
            "invalid_request_error",
            None,
            "method_not_allowed",
        )
    if status == 413:
        limit = request.route_handler.resolve_request_max_body_size() if "route_handler" in request.scope else None
        hint = f" of {limit / 1_000_000:.1f} MB" if limit else ""
        return error_response(
            413,
            f"the request body is larger than the limit{hint}; send a shorter or compressed recording",
            "invalid_request_error",
            None,
            "payload_too_large",
        )
    if status == 401:
        return error_response(
            401, str(exc.detail), "authentication_error", None, "invalid_api_key", **{"WWW-Authenticate": "Bearer"}
        )
    if status >= 500:
        logger.error(
            "request %s: HTTP %d on %s %s: %s",
            request_id(request),
            status,
            request.method,
            request.url.path,
            exc.detail,
        )
        return error_response(status, "internal server error", "server_error", None, None)
    return error_response(status, str(exc.detail), "invalid_request_error", None, None, **(exc.headers or {}))


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Render any exception as the error envelope (registered for ``Exception`` on the app)."""
    if isinstance(exc, FlashTTSError):
        headers: dict[str, str] = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(max(1, int(exc.retry_after)))
        elif isinstance(exc, AuthenticationError):
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status_code >= 500 and not isinstance(exc, (OverloadedError, BackendNotReadyError)):
            logger.warning(
                "request %s: %s on %s %s: %s",
                request_id(request),
                type(exc).__name__,
                request.method,
                request.url.path,
                exc.message,
            )
        return Response(exc.to_dict(), status_code=exc.status_code, headers=headers or None)
    if isinstance(exc, HTTPException):
        return _http_error(exc, request)
    logger.error(
        "request %s: unhandled error on %s %s", request_id(request), request.method, request.url.path, exc_info=exc
    )
    return error_response(500, "internal server error; see the server log", "server_error", None, None)
