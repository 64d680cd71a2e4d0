"""Reference-audio URLs cannot reach internal addresses, whatever the spelling.

Loopback spellings are tested end to end against a listener on 127.0.0.1 that must receive NOTHING. Other
non-public ranges are tested at :func:`fetch_url` with a transport that records instead of connecting, so even a
regression could not send a packet off this machine.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import anyio
import httpx
import pytest

from flashtts_core.server import fetch
from flashtts_core.server.fetch import UrlFetchError, UrlNotAllowedError, fetch_url
from tests.server.conftest import Server
from tests.server.helpers import assert_error, local_http, redirect_to, reference_wav, serve_bytes

REF = reference_wav(1.0)

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/a.wav",
    "http://2130706433:{port}/a.wav",  # decimal
    "http://0x7f000001:{port}/a.wav",  # hex
    "http://0x7f.1:{port}/a.wav",  # hex, short form
    "http://127.1:{port}/a.wav",  # short form
    "http://0177.0.0.1:{port}/a.wav",  # octal (refused as an invalid URL)
    "http://0:{port}/a.wav",  # 0.0.0.0 reaches local listeners
    "http://[::]:{port}/a.wav",
    "http://localhost:{port}/a.wav",
    "http://LocalHost:{port}/a.wav",
    "http://[::ffff:127.0.0.1]:{port}/a.wav",  # IPv4-mapped IPv6
    "http://[::ffff:7f00:1]:{port}/a.wav",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/a.wav",
    "http://[::1]:{port}/a.wav",
    "http://[64:ff9b::7f00:1]:{port}/a.wav",  # NAT64 of 127.0.0.1
    "http://attacker.example@127.0.0.1:{port}/a.wav",  # userinfo trick
    "http://127\u30020\u30020\u30021:{port}/a.wav",  # ideographic full stops
    "https://127.0.0.1:{port}/a.wav",
    "HTTP://127.0.0.1:{port}/a.wav",
]
OTHER_SCHEMES = [
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "  file:///etc/passwd",
    "ftp://127.0.0.1:{port}/a.wav",
    "gopher://127.0.0.1:{port}/_GET%20/",
    "dict://127.0.0.1:{port}/info",
    "ldap://127.0.0.1:{port}/",
    "http:/127.0.0.1:{port}/a.wav",  # not a URL at all: refused as base64
]


def _routes(url: str) -> list[tuple[str, str, dict, bool]]:
    return [
        ("/clone_voice", "reference_audio", {"text": "hi", "reference_audio": url}, False),
        ("/add_speaker", "audio", {"name": "ssrf", "audio": url}, False),
        ("/v1/audio/speech", "voice", {"input": "hi", "voice": url}, True),
    ]


def _refused_through_http(server: Server, url: str) -> None:
    """A 4xx naming the field on every route that takes a reference (400; a 404 when the OpenAI route reads a
    short non-URL as a voice name)."""
    for path, field, body, as_json in _routes(url):
        response = server.client.post(path, json=body) if as_json else server.client.post(path, data=body)
        assert response.status_code in (400, 404), (path, response.status_code, response.text)
        assert_error(response, response.status_code, field)


@pytest.mark.parametrize("template", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused(server: Server, template: str) -> None:
    with local_http(serve_bytes(REF)) as target:
        _refused_through_http(server, template.format(port=target.port))
        assert target.requests == []
    assert "ssrf" not in server.client.get("/audio_roles").json()["roles"]


@pytest.mark.parametrize("template", OTHER_SCHEMES)
def test_other_schemes_are_never_fetched(server: Server, template: str) -> None:
    with local_http(serve_bytes(REF)) as target:
        _refused_through_http(server, template.format(port=target.port))
        assert target.requests == []


def test_ipv6_loopback_listener_receives_nothing(server: Server) -> None:
    """A raw TCP listener on [::1]: not one connection may arrive."""
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    listener.listen(8)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        for url in (
            f"http://[::1]:{port}/a.wav",
            f"http://[0:0:0:0:0:0:0:1]:{port}/a.wav",
            f"http://localhost:{port}/a.wav",
            f"http://[::]:{port}/a.wav",
        ):
            _refused_through_http(server, url)
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert accepted == []


NON_PUBLIC_URLS = [
    "http://10.0.0.1/a.wav",
    "http://10.1/a.wav",  # short form of 10.0.0.1
    "http://172.16.5.4/a.wav",
    "http://192.168.1.1/a.wav",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://2852039166/latest/meta-data/",  # the same, decimal
    "http://0xa9fea9fe/latest/meta-data/",  # the same, hex
    "http://100.64.0.1/a.wav",  # carrier-grade NAT
    "http://198.18.0.1/a.wav",  # benchmarking
    "http://192.0.2.1/a.wav",  # documentation
    "http://224.0.0.1/a.wav",  # multicast
    "http://239.255.255.250/a.wav",
    "http://240.0.0.1/a.wav",  # reserved
    "http://255.255.255.255/a.wav",  # broadcast
    "http://[fe80::1]/a.wav",  # link-local
    "http://[fc00::1]/a.wav",  # unique local
    "http://[fd12:3456::1]/a.wav",
    "http://[ff02::1]/a.wav",  # multicast
    "http://[2001:db8::1]/a.wav",  # documentation
    "http://[::ffff:10.0.0.1]/a.wav",
    "http://[::ffff:169.254.169.254]/a.wav",
    "http://[64:ff9b::a9fe:a9fe]/a.wav",  # NAT64 of the metadata address
    "http://[2002:a9fe:a9fe::1]/a.wav",  # 6to4 of the metadata address
]


@pytest.mark.parametrize("url", NON_PUBLIC_URLS)
def test_non_public_ranges_never_connect(url: str) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=REF)

    transport = httpx.MockTransport(record)
    with pytest.raises(UrlNotAllowedError):
        anyio.run(lambda: fetch_url(url, max_bytes=100_000, timeout_s=2.0, param="voice", transport=transport))
    assert sent == []


def test_redirects_are_checked_on_every_hop(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.2 plays a public host; each of its redirects to an internal target is refused unfetched."""
    allowed = ipaddress.ip_address("127.0.0.2")
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: ip == allowed)
    with local_http(serve_bytes(REF)) as internal:
        targets = [
            f"http://2130706433:{internal.port}/secret",
            f"http://0x7f.1:{internal.port}/secret",
            f"http://[::ffff:127.0.0.1]:{internal.port}/secret",
            "file:///etc/passwd",
            f"gopher://127.0.0.1:{internal.port}/_x",
        ]
        for target in targets:
            with local_http(redirect_to(target), host="127.0.0.2") as public:
                response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": public.url()})
                assert_error(response, 400, "reference_audio", "url_not_allowed")
                assert len(public.requests) == 1
        assert internal.requests == []


def test_slow_drip_hits_the_overall_deadline() -> None:
    """A server that sends one byte at a time, never tripping the read timeout, is cut by the overall deadline."""

    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "audio/wav")
        h.end_headers()
        try:
            for _ in range(100):  # at most 10 s; the client leaves long before
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    with local_http(drip) as slow:
        begin = time.monotonic()
        with pytest.raises(UrlFetchError, match="took too long"):
            anyio.run(lambda: fetch_url(slow.url(), max_bytes=100_000, timeout_s=0.4, allow_private=True))
        print(f"cut after {time.monotonic() - begin:.2f} s")


def test_size_cap_while_streaming_through_http(server: Server) -> None:
    """A URL whose body has no Content-Length and keeps coming is cut at the upload limit (413)."""
    limit = server.state.settings.max_upload_bytes

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(limit // 65536 + 8):
                h.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    with local_http(endless) as big, server.settings_changed(allow_private_urls=True):
        response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": big.url()})
        assert_error(response, 413, "reference_audio", "payload_too_large")


def test_base64_is_not_a_url(server: Server) -> None:
    """A data: URL is decoded locally, never fetched; garbage is an invalid_base64 error, not a fetch."""
    with local_http(serve_bytes(REF)) as target:
        data_url = "data:audio/wav;base64," + base64.b64encode(b"not audio").decode()
        response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": data_url})
        assert_error(response, 400, "reference_audio")
        assert target.requests == []
