"""The real server for the reliability tests: the tiny Spark checkpoint on the real torch backend, loaded once.

As in ``tests/server``, one app is reachable through Litestar's ``TestClient`` (which ran the lifespan) and through
a real uvicorn on 127.0.0.1 (true streaming, real disconnects, real concurrency). Every loop in these tests is
bounded in count and time and talks to loopback only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.conftest import Server, serve_tiny_spark

MAX_UPLOAD = 2_000_000
# Many short sentences in many segments: a generation of tens of seconds on a CPU (the tests stop it early).
LONG_TEXT = " ".join(f"Sentence number {i} is here." for i in range(40))
LONG_BODY = {"name": "female", "text": LONG_TEXT, "length_threshold": 5, "window_size": 5}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve_tiny_spark(tmp_path_factory.mktemp("reliability") / "roles", max_upload_bytes=MAX_UPLOAD) as running:
        yield running


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
