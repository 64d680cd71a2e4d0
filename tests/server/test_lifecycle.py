"""Start-up behaviour without loading a model: readiness before/after a failed load, fail-fast, CORS."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from litestar.testing import TestClient

from flashtts_core.config import ServerSettings
from flashtts_core.errors import PluginError
from flashtts_core.runtime import Plan, Runtime, resolve
from flashtts_core.server import create_app
from flashtts_core.testing.checkpoints import tiny_checkpoint_dir
from tests.server.helpers import assert_error


@pytest.fixture(scope="module")
def settings() -> ServerSettings:
    return ServerSettings(model_path=str(tiny_checkpoint_dir("spark")), backend="torch")


def _gated_failure(release: threading.Event):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def factory(plan: Plan) -> AsyncIterator[Runtime]:
        while not release.is_set():  # noqa: ASYNC110 - a threading.Event, set from the test's thread
            await anyio.sleep(0.02)
        raise PluginError("the weights are missing")
        yield  # pragma: no cover

    return factory


def test_ready_is_503_until_loaded(settings: ServerSettings) -> None:
    release = threading.Event()
    app = create_app(settings, plan=resolve(settings), runtime_factory=_gated_failure(release), background_load=True)
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        loading = assert_error(client.get("/ready"), 503, None, "not_ready")
        assert "loading" in loading["message"]
        assert_error(client.post("/speak", json={"name": "female", "text": "hi"}), 503, None, "not_ready")
        assert client.get("/docs").status_code == 200
        release.set()
        deadline = time.monotonic() + 10
        while "failed" not in client.get("/ready").json()["error"]["message"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        failed = assert_error(client.get("/ready"), 503, None, "not_ready")
        assert "the weights are missing" in failed["message"]
        assert client.get("/health").status_code == 200


def test_shutdown_while_loading(settings: ServerSettings) -> None:
    app = create_app(
        settings, plan=resolve(settings), runtime_factory=_gated_failure(threading.Event()), background_load=True
    )
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 503
    # leaving the block cancelled the pending load without hanging


def test_blocking_load_fails_fast(settings: ServerSettings) -> None:
    release = threading.Event()
    release.set()
    app = create_app(settings, plan=resolve(settings), runtime_factory=_gated_failure(release))
    with pytest.raises(BaseException) as excinfo, TestClient(app):
        pass
    error = excinfo.value
    while hasattr(error, "exceptions"):  # the test client wraps start-up errors in task groups
        error = error.exceptions[0]
    assert isinstance(error, PluginError) and "weights are missing" in error.message


def test_cors_off_by_default_and_configurable(settings: ServerSettings) -> None:
    never = threading.Event()
    plan = resolve(settings)
    closed = create_app(settings, plan=plan, runtime_factory=_gated_failure(never), background_load=True)
    with TestClient(closed) as client:
        response = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
    allowed = ServerSettings(model_path=settings.model_path, cors_origins=("https://app.example",))
    opened = create_app(allowed, plan=plan, runtime_factory=_gated_failure(never), background_load=True)
    with TestClient(opened) as client:
        response = client.get("/health", headers={"Origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        preflight = client.options(
            "/v1/audio/speech",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code in (200, 204)
