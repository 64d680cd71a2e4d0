"""The real server for the reliability tests: the tiny Spark checkpoint on the real torch backend, loaded once.

As in ``tests/server``, one app is reachable through Litestar's ``TestClient`` (which ran the lifespan) and through
a real uvicorn on 127.0.0.1 (true streaming, real disconnects, real concurrency). Every loop in these tests is
bounded in count and time and talks to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from litestar.testing import TestClient

from flashtts_core.config import ServerSettings
from flashtts_core.server import create_app
from flashtts_core.testing.checkpoints import tiny_checkpoint_dir
from tests.server.conftest import Server

MAX_UPLOAD = 2_000_000
# Many short sentences in many segments: a generation of tens of seconds on a CPU (the tests stop it early).
LONG_TEXT = " ".join(f"Sentence number {i} is here." for i in range(40))
LONG_BODY = {"name": "female", "text": LONG_TEXT, "length_threshold": 5, "window_size": 5}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    role_dir = tmp_path_factory.mktemp("reliability") / "roles"
    settings = ServerSettings(
        model_path=str(tiny_checkpoint_dir("spark")),
        backend="torch",
        role_dir=str(role_dir),
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        max_upload_bytes=MAX_UPLOAD,
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


def load(server: Server) -> dict[str, Any]:
    """Backend and service counters, read on the server's loop."""

    async def read() -> dict[str, Any]:
        health = await server.runtime.backend.health()
        return {
            "running": health.running,
            "waiting": health.waiting,
            "active": server.runtime.service.active_requests,
            "tasks": len(asyncio.all_tasks()),
        }

    return server.call(read)


def wait_idle(server: Server, timeout: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) until nothing runs: backend running == waiting == 0 and no admitted request."""
    deadline = time.monotonic() + timeout
    while True:
        now = load(server)
        if now["running"] == 0 and now["waiting"] == 0 and now["active"] == 0:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy {timeout:g} s later: {now}")
        time.sleep(0.1)


@pytest.fixture
def idle(server: Server) -> Iterator[Server]:
    """The server, idle before the test and checked idle after it."""
    wait_idle(server)
    yield server
    wait_idle(server)


@pytest.fixture
def no_model_work(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails any request that reaches the engine (synthesis or reference encoding): limits must come first."""
    calls: list[str] = []
    engine = server.runtime.engine

    def synthesize(request: Any) -> Any:
        calls.append(f"synthesize {request.request_id}")
        raise AssertionError("the request reached the engine")

    async def prepare_voice(reference: Any) -> Any:
        calls.append("prepare_voice")
        raise AssertionError("the request reached the engine")

    monkeypatch.setattr(engine, "synthesize", synthesize)
    monkeypatch.setattr(engine, "prepare_voice", prepare_voice)
    monkeypatch.setattr(server.runtime.service.voices, "_prepare", prepare_voice)
    return calls
