"""Test helpers: reference recordings, decoding responses with PyAV, checking the error envelope."""

from __future__ import annotations

import io
import threading
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import av
import numpy as np

__all__ = ("LocalHTTP", "assert_error", "decode", "local_http", "redirect_to", "reference_wav", "serve_bytes")


def reference_wav(seconds: float = 2.0, rate: int = 16000) -> bytes:
    """A voiced-sounding mono 16-bit WAV: a gliding harmonic tone with a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    x = 0.3 * x / np.max(np.abs(x)) + 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def decode(data: bytes, fmt: str, pcm_rate: int | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of a response body; ``pcm`` needs its rate."""
    if fmt == "pcm":
        assert pcm_rate is not None
        assert len(data) % 2 == 0
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0, pcm_rate
    pieces: list[np.ndarray] = []
    rate = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            rate = frame.sample_rate
            array = frame.to_ndarray()
            pieces.append(array.reshape(-1).astype(np.float32) if array.shape[0] == 1 else array.mean(axis=0))
    assert pieces, f"no audio decoded from {fmt}"
    return np.concatenate(pieces), rate


def assert_error(response: Any, status: int, param: str | None = ..., code: str | None = ...) -> dict[str, Any]:  # type: ignore[assignment]
    """The response is ``status`` with the OpenAI error envelope (and the given param/code if given)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


class LocalHTTP:
    """A tiny HTTP server on a loopback address that records every request it gets."""

    def __init__(self, handler: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, dict(self.headers.items())))
                handler(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str = "/ref.wav") -> str:
        return f"http://{self.host}:{self.port}{path}"


@contextmanager
def local_http(handler: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1") -> Iterator[LocalHTTP]:
    server = LocalHTTP(handler, host)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def serve_bytes(data: bytes, content_type: str = "audio/wav") -> Callable[[BaseHTTPRequestHandler], None]:
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return handler


def redirect_to(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handler
