"""Overload over real HTTP (uvicorn on 127.0.0.1): bounded admission, a responsive event loop, the time budget."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from tests.reliability.conftest import LONG_BODY, load, wait_idle
from tests.server.conftest import Server
from tests.server.helpers import assert_error, decode


@contextmanager
def _held_streams(server: Server, count: int, body: dict) -> Iterator[list[httpx.Response]]:
    """``count`` streamed syntheses that have started (first bytes read) and are kept open, then closed."""
    keep = []  # the body iterators: a dropped one closes its connection at once
    with ExitStack() as stack:
        responses = []
        for _ in range(count):
            http = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=120))
            response = stack.enter_context(http.stream("POST", "/speak", json=body))
            assert response.status_code == 200, response.read()
            pieces = response.iter_raw()
            assert next(pieces)
            keep.append(pieces)
            responses.append(response)
        yield responses


def test_admission_limit_under_real_concurrency(idle: Server) -> None:
    server = idle
    service = server.runtime.service
    original = service.max_queue
    service.max_queue = 2
    body = {**LONG_BODY, "stream": True, "response_format": "pcm"}
    try:
        with _held_streams(server, 2, body):
            assert load(server)["active"] == 2
            with httpx.Client(base_url=server.base_url, timeout=120) as http:
                for path, payload in (
                    ("/speak", {"name": "female", "text": "One more.", "stream": True}),
                    ("/v1/audio/speech", {"input": "One more.", "voice": "female"}),
                    ("/multi_speak", {"text": "<role:female>One more."}),
                ):
                    refused = http.post(path, json=payload)
                    error = assert_error(refused, 503, None, "overloaded")
                    assert error["type"] == "server_overloaded"
                    assert int(refused.headers["retry-after"]) >= 1
                    assert refused.headers["x-request-id"]
            # The refusals happened while both admitted streams were still running.
            assert load(server)["active"] == 2
    finally:
        service.max_queue = original
    wait_idle(server)


def _open_requests(server: Server, count: int, body: dict) -> list[socket.socket]:
    """``count`` raw HTTP requests sent and left open (their responses are not read)."""
    port = int(server.base_url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = (
        f"POST /speak HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head + data)
        sockets.append(sock)
    return sockets


def test_loop_answers_while_16_generations_run(idle: Server) -> None:
    """/health and the voice lists answer while 16 streamed generations are in progress (the loop is free)."""
    server = idle
    sockets = _open_requests(server, 16, {**LONG_BODY, "stream": True, "response_format": "pcm"})
    latencies: dict[str, list[float]] = {"/health": [], "/v1/audio/voices": [], "/audio_roles": [], "/ready": []}
    try:
        deadline = time.monotonic() + 60
        while load(server)["active"] < 16:
            assert time.monotonic() < deadline, f"the 16 generations were not admitted: {load(server)}"
            time.sleep(0.05)
        with httpx.Client(base_url=server.base_url, timeout=60) as probe:
            for _round in range(5):
                assert load(server)["active"] == 16  # still saturated while we probe
                for path, times in latencies.items():
                    begin = time.monotonic()
                    response = probe.get(path)
                    times.append(time.monotonic() - begin)
                    assert response.status_code == 200, (path, response.text)
                time.sleep(0.1)
    finally:
        for sock in sockets:
            sock.close()
    print("latencies while 16 generations ran (s):", {k: [round(x, 3) for x in v] for k, v in latencies.items()})
    wait_idle(server, timeout=60)


def test_time_budget_before_the_stream_starts(idle: Server) -> None:
    server = idle
    with server.settings_changed(request_timeout=0.001):
        for stream in (True, False):
            response = server.client.post("/speak", json={**LONG_BODY, "stream": stream})
            error = assert_error(response, 504, None, "timeout")
            assert "--request_timeout" in error["message"]
    wait_idle(server)


def _first_byte_seconds(server: Server, body: dict) -> float:
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        begin = time.monotonic()
        with http.stream("POST", "/speak", json=body) as response:
            assert response.status_code == 200
            next(response.iter_raw())
            return time.monotonic() - begin


def test_time_budget_ends_a_started_stream_cleanly(idle: Server) -> None:
    """Past the budget a started stream ends cleanly (a complete WAV / an SSE error event) and frees the backend."""
    server = idle
    body = {**LONG_BODY, "stream": True, "response_format": "wav"}
    ttfa = _first_byte_seconds(server, body)
    wait_idle(server)
    metrics = server.state.metrics
    assert metrics is not None
    before = metrics.timeouts.labels("/speak")._value.get()
    budget = 2 * ttfa + 1.5
    for _attempt in range(3):  # a busy machine may need a longer budget for the stream to start at all
        with (
            server.settings_changed(request_timeout=budget),
            httpx.Client(base_url=server.base_url, timeout=120) as http,
        ):
            response = http.post("/speak", json=body)
        if response.status_code == 200:
            break
        assert_error(response, 504, None, "timeout")
        budget *= 2
    assert response.status_code == 200
    samples, rate = decode(response.content, "wav")  # the body is a complete, well-formed file
    assert rate == 16000 and samples.size > 0
    wait_idle(server)
    assert metrics.timeouts.labels("/speak")._value.get() == before + 1

    sse = {"input": LONG_BODY["text"], "voice": "female", "stream_format": "sse", "response_format": "pcm"}
    sse |= {"length_threshold": 5, "window_size": 5}
    with server.settings_changed(request_timeout=budget), httpx.Client(base_url=server.base_url, timeout=120) as http:
        response = http.post("/v1/audio/speech", json=sse)
    assert response.status_code == 200
    events = [json.loads(e[len("data: ") :]) for e in response.text.split("\n\n") if e.strip()]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "speech.audio.error" and events[-1]["error"]["code"] == "timeout"
    wait_idle(server)


def test_time_budget_for_a_whole_file(idle: Server) -> None:
    """A non-streamed request that runs out of budget after its first audio is a 504 (one deadline, not two)."""
    server = idle
    ttfa = _first_byte_seconds(server, {**LONG_BODY, "stream": True, "response_format": "pcm"})
    wait_idle(server)
    with server.settings_changed(request_timeout=2 * ttfa + 1.0):
        response = server.client.post("/speak", json={**LONG_BODY, "response_format": "wav"})
    assert_error(response, 504, None, "timeout")
    wait_idle(server)
