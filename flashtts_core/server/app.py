"""``create_app``: the one factory of the HTTP server.

Layout of the app (a table of contents for everything wired here):

* lifespan: resolve the plan (if the CLI did not), open the runtime (backend → engine → voices → warm-up) and
  keep it in ``app.state.server``; shut it down on exit. By default loading happens *before* the server
  accepts connections, so a model that cannot load stops the process with its error (fail fast, like the
  original). ``background_load=True`` serves ``/health`` at once and ``/ready`` answers 503 until the model is
  loaded, for orchestrators that probe during a long load.
* routers: the native API at ``/`` and again under ``/v1`` (hidden from the docs), the OpenAI API under
  ``/v1``, both behind the ``--api_key`` guard; public: ``/``, ``/static/*``, ``/health``, ``/ready``,
  ``/docs``, ``/openapi.json``.
* one exception handler for everything (:mod:`flashtts_core.server.errors`).
* limits, enforced while the body is read (→ 413): bodies of routes that carry audio up to ``max_upload_bytes``
  plus room for base64 (4/3) and form overhead; the text-only JSON routes (``/speak``, ``/multi_speak``) up to
  what ``max_text_chars`` characters can take as escaped JSON plus 64 KiB; at most :data:`FORM_PART_LIMIT`
  parts in a multipart form.
* request context (:mod:`flashtts_core.server.context`): ``X-Request-Id`` on every response, per-request start
  time; per-app Prometheus metrics (:mod:`flashtts_core.server.metrics`) at ``/metrics``.
* CORS only when ``cors_origins`` is set.

Layers stay apart: controllers parse and validate HTTP input, the :class:`SynthesisService` resolves voices and
admits requests, the engine synthesises; :mod:`.responses` encodes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from flashtts_core import __version__
from flashtts_core.config import ServerSettings
from flashtts_core.errors import FlashTTSError
from flashtts_core.runtime import Plan, Runtime, open_runtime, resolve
from flashtts_core.server.auth import require_api_key
from flashtts_core.server.context import on_response_start, request_context_middleware
from flashtts_core.server.controllers.native import NativeController
from flashtts_core.server.controllers.openai import OpenAIController
from flashtts_core.server.controllers.system import STATIC_DIR, favicon, health, index, metrics, openapi_json, ready
from flashtts_core.server.docs import OfflineDocsPlugin
from flashtts_core.server.errors import handle_exception
from flashtts_core.server.metrics import Metrics
from flashtts_core.server.state import ServerState, provide_runtime, provide_settings

__all__ = ("FORM_PART_LIMIT", "RuntimeFactory", "create_app")

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[Plan], AbstractAsyncContextManager[Runtime]]

_BODY_MARGIN = 1024 * 1024  # multipart headers and the other form fields
_JSON_MARGIN = 64 * 1024  # the other JSON fields of a text-only request
# Parts of one multipart form: the largest form (/clone_voice) has 16 fields; a body of thousands of tiny parts
# costs parsing time and memory for nothing.
FORM_PART_LIMIT = 32
_TEXT_ONLY_ROUTES = frozenset({"speak", "multi_speak"})


def _body_limit(settings: ServerSettings) -> int:
    """Largest accepted request body: an upload sent as base64 inside JSON/form is 4/3 of its size."""
    return settings.max_upload_bytes * 4 // 3 + _BODY_MARGIN


def _text_body_limit(settings: ServerSettings) -> int:
    """Largest body of a text-only JSON route: every character escaped as a surrogate pair (12 bytes)."""
    return settings.max_text_chars * 12 + _JSON_MARGIN


def _limit_text_routes(app: Litestar, limit: int) -> None:
    """Give the text-only routes their smaller body limit (the handlers are this app's own copies)."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if getattr(handler, "handler_name", None) in _TEXT_ONLY_ROUTES:
                handler.request_max_body_size = limit


def _attach(state: ServerState, runtime: Runtime) -> None:
    """Apply the settings the runtime does not take itself, then publish it."""
    runtime.service.max_segments = state.settings.max_segments
    state.runtime = runtime


def _lifespan(
    state: ServerState, plan: Plan | None, factory: RuntimeFactory, background_load: bool
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    async def load_and_hold(stop: anyio.Event) -> None:
        try:
            resolved = plan if plan is not None else await anyio.to_thread.run_sync(resolve, state.settings)
            async with factory(resolved) as runtime:
                _attach(state, runtime)
                logger.info("ready: %s on %s", runtime.model_name, runtime.backend.name)
                try:
                    await stop.wait()
                finally:
                    state.runtime = None
        except Exception as exc:
            state.load_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            trace = None if isinstance(exc, FlashTTSError) else exc  # our errors carry a complete message
            logger.error("the model failed to load: %s", state.load_error, exc_info=trace)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if background_load:
            stop = anyio.Event()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load_and_hold, stop)
                try:
                    yield
                finally:
                    stop.set()
                    if state.runtime is None:  # still loading: abandon the load
                        tasks.cancel_scope.cancel()
            return
        resolved = plan if plan is not None else await anyio.to_thread.run_sync(resolve, state.settings)
        async with factory(resolved) as runtime:
            _attach(state, runtime)
            logger.info("ready: %s on %s", runtime.model_name, runtime.backend.name)
            try:
                yield
            finally:
                state.runtime = None

    return lifespan


def create_app(
    settings: ServerSettings,
    *,
    plan: Plan | None = None,
    runtime_factory: RuntimeFactory | None = None,
    background_load: bool = False,
) -> Litestar:
    """Build the Litestar app for ``settings``.

    ``plan``: what :func:`flashtts_core.runtime.resolve` decided (resolved at start-up when omitted).
    ``runtime_factory``: replaces :func:`flashtts_core.runtime.open_runtime` (same signature).
    ``background_load``: see the module docstring.
    """
    state = ServerState(settings, Metrics())
    api_dependencies = {
        "runtime": Provide(provide_runtime, sync_to_thread=False),
        "settings": Provide(provide_settings, sync_to_thread=False),
        "started_at": Provide(lambda: state.started_at, sync_to_thread=False),
    }
    native = Router("/", route_handlers=[NativeController], guards=[require_api_key], dependencies=api_dependencies)
    v1 = Router(
        "/v1",
        route_handlers=[
            OpenAIController,
            Router("/", route_handlers=[NativeController], include_in_schema=False),
        ],
        guards=[require_api_key],
        dependencies=api_dependencies,
    )
    static = create_static_files_router(
        path="/static", directories=[STATIC_DIR], name="static", include_in_schema=False
    )
    openapi = OpenAPIConfig(
        title="FlashTTS",
        version=__version__,
        description="LLM-based text-to-speech: the FlashTTS API and an OpenAI-compatible speech API. "
        'Errors are always {"error": {"message", "type", "param", "code"}}. '
        "Native routes also answer under /v1 (e.g. /v1/speak). With --api_key, send 'Authorization: Bearer KEY'.",
        path="/docs",
        render_plugins=[
            OfflineDocsPlugin(path="/", json_path="/openapi.json"),
            JsonRenderPlugin(path="/openapi.json"),
            SwaggerRenderPlugin(path="/swagger"),
        ],
    )
    cors = CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None
    factory: RuntimeFactory = runtime_factory or open_runtime
    app = Litestar(
        route_handlers=[native, v1, static, health, ready, index, favicon, openapi_json, metrics],
        lifespan=[_lifespan(state, plan, factory, background_load)],
        exception_handlers={Exception: handle_exception},
        openapi_config=openapi,
        cors_config=cors,
        middleware=[request_context_middleware],
        before_send=[on_response_start],
        request_max_body_size=_body_limit(settings),
        multipart_form_part_limit=FORM_PART_LIMIT,
        logging_config=None,
        debug=False,
        state=State({"server": state}),
    )
    _limit_text_routes(app, _text_body_limit(settings))
    return app
