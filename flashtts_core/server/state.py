"""What the app keeps between requests: settings, the loaded runtime (once ready), and how loading went.

Handlers get the runtime through the ``runtime`` dependency (:func:`provide_runtime`), which answers 503 while
the model is still loading (``create_app(..., background_load=True)``) or after it failed to load, so no
handler ever sees a half-started engine.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from litestar import Request

from flashtts_core.config import ServerSettings
from flashtts_core.errors import BackendNotReadyError
from flashtts_core.runtime import Runtime

if TYPE_CHECKING:
    from flashtts_core.server.metrics import Metrics

__all__ = ("ServerState", "provide_runtime", "provide_settings", "server_state")


class ServerState:
    """Mutable per-app state (stored as ``app.state.server``)."""

    __slots__ = ("load_error", "metrics", "runtime", "settings", "started_at")

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.started_at = int(time.time())
        self.metrics = metrics

    def require_runtime(self) -> Runtime:
        runtime = self.runtime
        if runtime is None:
            if self.load_error is not None:
                raise BackendNotReadyError(f"the model failed to load: {self.load_error}")
            raise BackendNotReadyError("the model is still loading; retry in a moment (see GET /ready)")
        return runtime


def server_state(request: Request[Any, Any, Any]) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def provide_runtime(request: Request[Any, Any, Any]) -> Runtime:
    """Dependency: the loaded runtime, or a 503 while there is none."""
    return server_state(request).require_runtime()


def provide_settings(request: Request[Any, Any, Any]) -> ServerSettings:
    """Dependency: the server settings (read per request, so tests may swap them on a running app)."""
    return server_state(request).settings
