"""``--api_key``: the bearer-token guard of every API route.

It is a Litestar guard attached to the API routers only, so the web page (``/``, ``/static``), ``/health``,
``/ready`` and the API documentation stay reachable without a key (a browser cannot add an ``Authorization``
header to a page navigation; the original server locked its own web page out). Guards run before the request
body is read, so an unauthenticated upload is refused without being parsed.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from flashtts_core.errors import AuthenticationError

__all__ = ("require_api_key",)

logger = logging.getLogger(__name__)


def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Reject the request unless it carries ``Authorization: Bearer <api_key>`` (no-op without a key).

    The comparison is constant-time (``secrets.compare_digest`` on bytes) so response timing does not reveal
    how much of a guessed key was right.
    """
    expected: str | None = connection.app.state.server.settings.api_key
    if not expected:
        return
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "missing API key: send the header 'Authorization: Bearer <key>' (the key given with --api_key)"
        )
    if not secrets.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8")):
        raise AuthenticationError("invalid API key")
