"""Reference URLs: http(s) only, no private/loopback targets (checked after DNS, on every redirect hop), capped."""

from __future__ import annotations

import ipaddress
import time
from http.server import BaseHTTPRequestHandler

import anyio
import pytest

from flashtts_core.errors import InvalidRequestError, PayloadTooLargeError
from flashtts_core.server import fetch
from flashtts_core.server.fetch import UrlFetchError, UrlNotAllowedError, fetch_url, is_public_address, looks_like_url
from tests.server.conftest import Server
from tests.server.helpers import assert_error, local_http, redirect_to, reference_wav, serve_bytes

REF = reference_wav(1.0)


def test_loopback_url_refused_without_a_request(server: Server) -> None:
    with local_http(serve_bytes(REF)) as target:
        for url in (
            target.url(),
            f"http://localhost:{target.port}/ref.wav",
            f"http://[::ffff:127.0.0.1]:{target.port}/",
        ):
            response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": url})
            assert_error(response, 400, "reference_audio", "url_not_allowed")
        speech = server.client.post("/v1/audio/speech", json={"input": "hi", "voice": target.url()})
        assert_error(speech, 400, "voice", "url_not_allowed")
        added = server.client.post("/add_speaker", data={"name": "eve", "audio": target.url()})
        assert_error(added, 400, "audio", "url_not_allowed")
        assert target.requests == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.wav", "gopher://127.0.0.1:70/"])
def test_other_schemes_refused(server: Server, url: str) -> None:
    response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": url})
    assert_error(response, 400, "reference_audio", "url_not_allowed")


def test_redirect_to_loopback_refused(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hop 1 (127.0.0.2, declared "public" for this test) redirects to 127.0.0.1: the second hop is refused."""
    allowed = ipaddress.ip_address("127.0.0.2")
    monkeypatch.setattr(fetch, "is_public_address", lambda ip: ip == allowed)
    with (
        local_http(serve_bytes(REF)) as internal,
        local_http(redirect_to(internal.url()), host="127.0.0.2") as public,
    ):
        response = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": public.url()})
        assert_error(response, 400, "reference_audio", "url_not_allowed")
        assert len(public.requests) == 1
        assert internal.requests == []


def test_private_urls_allowed_when_configured(server: Server) -> None:
    with local_http(serve_bytes(REF)) as target, server.settings_changed(allow_private_urls=True):
        url = f"http://localhost:{target.port}/voice.wav"
        response = server.client.post("/add_speaker", data={"name": "urlvoice", "audio": url})
        assert response.status_code == 200, response.text
        path, headers = target.requests[0]
        assert path == "/voice.wav"
        assert headers["Host"] == f"localhost:{target.port}"  # connected by IP, original Host kept
    assert server.client.post("/delete_speaker", data={"name": "urlvoice"}).status_code == 200


# --- fetch_url on its own --------------------------------------------------------------------------------------


def _fetch(url: str, **kwargs: object) -> bytes:
    options = {"max_bytes": 100_000, "timeout_s": 5.0, "allow_private": True, "param": "voice"} | kwargs
    return anyio.run(lambda: fetch_url(url, **options))  # type: ignore[arg-type]


def test_fetch_follows_limited_redirects() -> None:
    with local_http(serve_bytes(REF)) as target, local_http(redirect_to(target.url("/final"))) as hop:
        assert _fetch(hop.url("/start")) == REF
        assert [p for p, _ in target.requests] == ["/final"]

    def loop(h: BaseHTTPRequestHandler) -> None:
        redirect_to(h.path + "x")(h)

    with local_http(loop) as looping:
        with pytest.raises(UrlFetchError, match="redirected more than 5"):
            _fetch(looping.url("/r"))
        assert len(looping.requests) == 6


def test_fetch_size_cap_and_errors() -> None:
    with local_http(serve_bytes(b"\0" * 200_000)) as big, pytest.raises(PayloadTooLargeError):
        _fetch(big.url())

    def chunked(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: the cap applies while reading
        h.send_response(200)
        h.end_headers()
        for _ in range(50):
            h.wfile.write(b"\0" * 10_000)

    with local_http(chunked) as stream, pytest.raises(PayloadTooLargeError):
        _fetch(stream.url())

    def missing(h: BaseHTTPRequestHandler) -> None:
        h.send_error(404)

    with local_http(missing) as not_found, pytest.raises(UrlFetchError, match="HTTP 404"):
        _fetch(not_found.url())

    def slow(h: BaseHTTPRequestHandler) -> None:
        time.sleep(1.5)
        serve_bytes(b"late")(h)

    with local_http(slow) as sleepy, pytest.raises(UrlFetchError):
        _fetch(sleepy.url(), timeout_s=0.3)

    with pytest.raises(UrlNotAllowedError):
        _fetch("http://127.0.0.1:9/x", allow_private=False)
    with pytest.raises(UrlFetchError):
        _fetch("http://name.invalid/x")
    with pytest.raises(InvalidRequestError):
        _fetch("http://127.0.0.1:1/refused")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_address_policy(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_url_detection() -> None:
    assert looks_like_url("https://example.com/a.wav")
    assert looks_like_url("file:///etc/passwd")
    assert not looks_like_url("UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA=")
    assert not looks_like_url("data:audio/wav;base64,UklGRg==")
