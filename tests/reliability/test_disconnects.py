"""Clients that go away: their LLM requests, codec work and admission slots are released within bounded time,
and storms of them leave nothing running and nothing growing (real uvicorn on 127.0.0.1, raw sockets)."""

from __future__ import annotations

import base64
import gc
import json
import os
import random
import socket
import struct
import threading
import time
import tracemalloc

import httpx

from tests.reliability.conftest import LONG_BODY, LONG_TEXT, load, wait_idle
from tests.server.conftest import Server
from tests.server.helpers import reference_wav

REF_B64 = base64.b64encode(reference_wav(1.0)).decode()
SPEECH = {"input": LONG_TEXT, "voice": "female", "length_threshold": 5, "window_size": 5}
REQUESTS: list[tuple[str, dict]] = [
    ("/speak", {**LONG_BODY, "stream": True, "response_format": "pcm"}),
    ("/speak", {**LONG_BODY, "response_format": "wav"}),
    ("/v1/audio/speech", {**SPEECH, "stream_format": "sse", "response_format": "pcm"}),
    ("/v1/audio/speech", {**SPEECH, "response_format": "mp3"}),
    ("/multi_speak", {"text": f"<role:female>{LONG_TEXT}<role:male>{LONG_TEXT}", "stream": True}),
    ("/v1/audio/speech", {**SPEECH, "voice": REF_B64, "response_format": "opus"}),  # clone: codec work first
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _client(port: int, path: str, payload: dict, delay: float, mode: str, abort: bool) -> None:
    """One client: sends the request (``mode`` "partial": only half the body), reads for ``delay`` s, leaves."""
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if abort:  # close with RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(head + (body[: len(body) // 2] if mode == "partial" else body))
        end = time.monotonic() + delay
        sock.settimeout(0.05)
        while time.monotonic() < end:
            try:
                if not sock.recv(65536) and mode != "partial":
                    return  # the server finished (or refused) before we left
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
    finally:
        sock.close()


def _storm(server: Server, clients: int, seed: int) -> dict[str, int]:
    """``clients`` concurrent clients that leave at random moments; returns the peak load seen meanwhile."""
    rng = random.Random(seed)
    port = int(server.base_url.rsplit(":", 1)[1])
    threads = []
    for i in range(clients):
        path, payload = REQUESTS[i % len(REQUESTS)]
        mode = "partial" if rng.random() < 0.15 else "full"
        args = (port, path, payload, rng.uniform(0.0, 1.5), mode, rng.random() < 0.5)
        threads.append(threading.Thread(target=_client, args=args, daemon=True))
    for thread in threads:
        thread.start()
    peak = {"running": 0, "active": 0}
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline, "a storm client hung"
        now = load(server)
        peak = {k: max(v, now[k]) for k, v in peak.items()}
        time.sleep(0.05)
    return peak


def _wait_tasks(server: Server, baseline: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        tasks = load(server)["tasks"]
        if tasks <= baseline + 1 or time.monotonic() > deadline:
            return tasks
        time.sleep(0.1)


def test_disconnect_releases_everything_quickly(idle: Server) -> None:
    """One client leaving mid-stream: LLM sequences, codec work and its slot are gone within seconds."""
    server = idle
    with (
        httpx.Client(base_url=server.base_url, timeout=120) as http,
        http.stream("POST", "/speak", json={**LONG_BODY, "stream": True, "response_format": "pcm"}) as response,
    ):
        pieces = response.iter_raw()
        assert next(pieces)
        assert load(server)["active"] == 1
    left = time.monotonic()
    wait_idle(server, timeout=15)
    print(f"released {time.monotonic() - left:.2f} s after the client left")


def test_storm_leaves_nothing_running_and_nothing_growing(idle: Server) -> None:
    server = idle
    baseline_tasks = load(server)["tasks"]
    seed = random.randrange(1 << 30)
    print("storm seed", seed)

    peak = _storm(server, 20, seed)  # also warms up every code path
    print("first storm peak", peak)
    assert peak["running"] > 0 and peak["active"] > 1  # the storm did reach the model
    wait_idle(server, timeout=60)
    tasks = _wait_tasks(server, baseline_tasks)
    assert tasks <= baseline_tasks + 1, (tasks, baseline_tasks)
    gc.collect()
    rss_before = _rss_bytes()

    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        peak = _storm(server, 20, seed + 1)
        wait_idle(server, timeout=60)
        tasks = _wait_tasks(server, baseline_tasks)
        gc.collect()
        traced_after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    gc.collect()
    rss_after = _rss_bytes()
    print(
        f"second storm: RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, "
        f"python heap {traced_before / 2**20:.1f} -> {traced_after / 2**20:.1f} MiB, "
        f"tasks {baseline_tasks} -> {tasks}, peak {peak}"
    )
    assert tasks <= baseline_tasks + 1, (tasks, baseline_tasks)
    assert load(server) | {"tasks": 0} == {"running": 0, "waiting": 0, "active": 0, "tasks": 0}
    # Generous: allocator caches and torch's arenas move; a leak of per-request state would show as steady growth.
    assert traced_after - traced_before < 32 * 2**20
    assert rss_after - rss_before < 200 * 2**20

    # The server still works.
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        response = http.post("/speak", json={"name": "male", "text": "Still here.", "response_format": "wav"})
    assert response.status_code == 200
