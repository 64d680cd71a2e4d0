"""One real server for all HTTP tests: the tiny random-weight Spark checkpoint on the real torch backend.

Loading the model is the expensive part (seconds), so it happens once per session. The same app instance is
reachable two ways, on the same event loop:

* ``server.client``: Litestar's ``TestClient`` (it runs the lifespan, i.e. loads the runtime);
* ``server.base_url``: a real uvicorn server on 127.0.0.1 (lifespan off, the TestClient already ran it) for the
  official ``openai`` client, true streaming and client disconnects.

Settings are read per request from ``app.state.server``, so :meth:`Server.settings_changed` can switch on
``--api_key`` or ``--allow_private_urls`` for one test and restore them afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient

from flashtts_core.config import ServerSettings
from flashtts_core.runtime import Runtime
from flashtts_core.server import create_app
from flashtts_core.server.state import ServerState
from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

MAX_UPLOAD = 2_000_000  # small, so 413 tests need only a few MB


class Server:
    """Handles on the running test server."""

    def __init__(self, app: Litestar, client: TestClient[Litestar], base_url: str, role_dir: Path) -> None:
        self.app = app
        self.client = client
        self.base_url = base_url
        self.role_dir = role_dir

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    @property
    def runtime(self) -> Runtime:
        runtime = self.state.runtime
        assert runtime is not None
        return runtime

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (sync or async) on the server's event loop."""
        return self.client.blocking_portal.call(fn, *args)

    @contextlib.contextmanager
    def settings_changed(self, **changes: Any) -> Iterator[ServerSettings]:
        original = self.state.settings
        self.state.settings = msgspec.structs.replace(original, **changes)
        try:
            yield self.state.settings
        finally:
            self.state.settings = original


@contextlib.contextmanager
def serve_tiny_spark(role_dir: Path, *, max_upload_bytes: int = MAX_UPLOAD) -> Iterator[Server]:
    """The real app on the tiny Spark checkpoint and the torch backend, loaded once, reachable through Litestar's
    ``TestClient`` (which runs the lifespan) and through a real uvicorn on 127.0.0.1 sharing the same app."""
    settings = ServerSettings(
        model_path=str(tiny_checkpoint_dir("spark")),
        backend="torch",
        role_dir=str(role_dir),
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        max_upload_bytes=max_upload_bytes,
    )
    app = create_app(settings)
    with TestClient(app, timeout=120) as client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", timeout_graceful_shutdown=2)
        uv = uvicorn.Server(config)
        future = client.blocking_portal.start_task_soon(uv.serve, [sock])
        deadline = time.monotonic() + 30
        while not uv.started:
            if future.done():
                future.result()
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        try:
            yield Server(app, client, f"http://127.0.0.1:{port}", role_dir)
        finally:
            uv.should_exit = True
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            sock.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve_tiny_spark(tmp_path_factory.mktemp("roles")) as running:
        yield running
