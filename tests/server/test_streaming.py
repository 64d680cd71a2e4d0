"""Real streaming over uvicorn: the first bytes arrive early, and a client that leaves stops the generation."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import Server
from tests.server.helpers import decode

# Many short sentences split into many segments: a long generation (tens of seconds on a CPU).
LONG_TEXT = " ".join(f"Sentence number {i} is here." for i in range(40))


def _wait_idle(server: Server, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ready = server.client.get("/ready").json()
        if ready["running"] == 0 and ready["active_requests"] == 0:
            return ready
        if time.monotonic() > deadline:
            raise AssertionError(f"generation still running {timeout}s after the client left: {ready}")
        time.sleep(0.1)


def test_disconnect_cancels_generation(server: Server) -> None:
    body = {
        "name": "female",
        "text": LONG_TEXT,
        "stream": True,
        "response_format": "pcm",
        "length_threshold": 5,
        "window_size": 5,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=120) as http,
        http.stream("POST", "/speak", json=body) as response,
    ):
        assert response.status_code == 200
        pieces = response.iter_raw()  # keep a reference: a dropped iterator closes the connection at once
        assert next(pieces)
        started = server.client.get("/ready").json()
        assert started["active_requests"] == 1
        # Leaving the block closed the connection mid-stream.
    _wait_idle(server, timeout=15)
    health = server.call(server.runtime.backend.health)
    assert health.running == 0

    # The server is fine afterwards.
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        response = http.post("/speak", json={"name": "male", "text": "Still here.", "response_format": "wav"})
    assert response.status_code == 200
    assert decode(response.content, "wav")[1] == 16000


def test_stream_arrives_in_pieces(server: Server) -> None:
    """A multi-segment stream reaches the client in several chunks, the first well before the end."""
    body = {"name": "female", "text": "One. Two. Three.", "stream": True, "response_format": "pcm"}
    body |= {"length_threshold": 2, "window_size": 2}
    arrivals: list[float] = []
    size = 0
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        start = time.monotonic()
        with http.stream("POST", "/speak", json=body) as response:
            assert response.headers["x-sample-rate"] == "16000"
            for piece in response.iter_raw():
                arrivals.append(time.monotonic() - start)
                size += len(piece)
    assert len(arrivals) >= 2
    assert arrivals[0] < arrivals[-1]
    assert size % 2 == 0 and size / 2 / 16000 > 1.0


def test_disconnect_stops_a_non_streamed_request(server: Server) -> None:
    """A client that gives up on a long non-streamed request stops the generation too."""
    body = {"name": "female", "text": LONG_TEXT, "response_format": "wav", "length_threshold": 5, "window_size": 5}
    with (
        httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(120, read=3.0)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/speak", json=body)
    _wait_idle(server, timeout=15)
