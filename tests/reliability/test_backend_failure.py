"""The LLM runtime dies under a running server (the torch backend's worker process, killed): the server stays up,
says so on ``/ready`` and refuses synthesis with 503 instead of hanging or answering 500."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.server.conftest import serve_tiny_spark

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the torch worker process needs a POSIX system")


def test_killed_worker_process_leaves_a_server_that_says_so(tmp_path: Path) -> None:
    pytest.importorskip("flashtts_torch")
    from flashtts_torch._process import ProcessRuntime

    with serve_tiny_spark(tmp_path / "roles") as server:
        client = server.client
        body = {"input": "hello there", "voice": "female", "response_format": "wav"}
        assert client.post("/v1/audio/speech", json=body).status_code == 200
        runtime = server.runtime.backend._runtime  # type: ignore[attr-defined]
        assert isinstance(runtime, ProcessRuntime) and runtime.pid is not None
        os.kill(runtime.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while runtime.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert "worker process exited" in ready.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # the server process itself lives on
        refused = client.post("/v1/audio/speech", json=body)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"
