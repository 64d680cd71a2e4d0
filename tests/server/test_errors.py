"""Client mistakes get a 4xx with the OpenAI error envelope naming the field; server faults a clean 5xx."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest

from flashtts_core.errors import GenerationError
from tests.server.conftest import MAX_UPLOAD, Server
from tests.server.helpers import assert_error, decode, reference_wav


def _silence_wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), "<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"name": "female"}, 400, "text"),
        ({"name": "female", "text": ""}, 400, "text"),
        ({"name": "female", "text": "   \n"}, 400, "text"),
        ({"text": "hi"}, 400, "name"),
        ({"name": "nobody", "text": "hi"}, 404, "name"),
        ({"name": "female", "text": "hi", "response_format": "ogg"}, 400, "response_format"),
        ({"name": "female", "text": "hi", "pitch": "loud"}, 400, "pitch"),
        ({"name": "female", "text": "hi", "temperature": -1}, 400, "temperature"),
        ({"name": "female", "text": "hi", "top_p": 0}, 400, "top_p"),
        ({"name": "female", "text": "hi", "top_k": "many"}, 400, "top_k"),
        ({"name": "female", "text": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"name": "female", "text": "hi", "window_size": 0}, 400, "window_size"),
        ({"name": "female", "text": "hi", "sample_rate": 100}, 400, "sample_rate"),
        ({"name": "female", "text": "x" * 4097}, 400, "text"),
    ],
)
def test_speak_bad_input(server: Server, body: dict, status: int, param: str) -> None:
    assert_error(server.client.post("/speak", json=body), status, param)


def test_unknown_voice_is_named(server: Server) -> None:
    error = assert_error(server.client.post("/speak", json={"name": "nobody", "text": "hi"}), 404, "name")
    assert "nobody" in error["message"] and "female" in error["message"]
    error = assert_error(
        server.client.post("/multi_speak", json={"text": "<role:female>Hi<role:ghost>Boo"}), 404, "text"
    )
    assert "ghost" in error["message"]
    assert_error(server.client.post("/multi_speak", json={"text": "no tags at all"}), 400, "text")
    assert_error(server.client.post("/multi_speak", json={"text": "<role:female,pitch:loud>Hi"}), 400, "text")


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"voice": "female"}, 400, "input", "missing_field"),
        ({"input": "", "voice": "female"}, 400, "input", "empty_text"),
        ({"input": "hi", "model": "gpt-5", "voice": "female"}, 404, "model", "model_not_found"),
        ({"input": "hi", "voice": "alloy"}, 404, "voice", "voice_not_found"),
        ({"input": "hi", "voice": {"name": "female"}}, 400, "voice", ...),
        ({"input": "hi", "voice": 3}, 400, "voice", ...),
        ({"input": "hi", "voice": "!" * 200}, 400, "voice", "invalid_base64"),
        ({"input": "hi", "voice": "file:///etc/passwd"}, 400, "voice", "url_not_allowed"),
        ({"input": "hi", "speed": 4.5}, 400, "speed", ...),
        ({"input": "hi", "speed": 0.1}, 400, "speed", ...),
        ({"input": "hi", "response_format": "ogg"}, 400, "response_format", ...),
        ({"input": "hi", "stream_format": "json"}, 400, "stream_format", ...),
    ],
)
def test_openai_bad_input(server: Server, body: dict, status: int, param: str, code: str | None) -> None:
    assert_error(server.client.post("/v1/audio/speech", json=body), status, param, code)


def test_text_limit_follows_settings(server: Server) -> None:
    with server.settings_changed(max_text_chars=10):
        error = assert_error(
            server.client.post("/v1/audio/speech", json={"input": "x" * 11}), 400, "input", "text_too_long"
        )
        assert "10" in error["message"]


def test_malformed_json_and_wrong_method(server: Server) -> None:
    response = server.client.post("/speak", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(response, 400)
    assert_error(server.client.get("/speak"), 405)
    assert_error(server.client.get("/no/such/route"), 404)


def test_clone_reference_inputs(server: Server) -> None:
    ref = reference_wav()
    both = server.client.post(
        "/clone_voice",
        files={"reference_audio_file": ("r.wav", ref, "audio/wav")},
        data={"text": "hi", "reference_audio": base64.b64encode(ref).decode()},
    )
    assert_error(both, 400, "reference_audio_file")
    assert_error(server.client.post("/clone_voice", data={"text": "hi"}), 400, "reference_audio")
    missing_text = server.client.post("/clone_voice", files={"reference_audio_file": ("r.wav", ref, "audio/wav")})
    assert_error(missing_text, 400, "text", "missing_field")
    garbage = server.client.post(
        "/clone_voice", files={"reference_audio_file": ("r.wav", b"\x00garbage" * 50, "audio/wav")}, data={"text": "hi"}
    )
    assert_error(garbage, 400, "reference_audio_file", "invalid_audio")
    empty = server.client.post(
        "/clone_voice", files={"reference_audio_file": ("r.wav", b"", "audio/wav")}, data={"text": "hi"}
    )
    assert_error(empty, 400, "reference_audio_file")
    bad_b64 = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": "not base64 at all!"})
    assert_error(bad_b64, 400, "reference_audio", "invalid_base64")
    short = server.client.post(
        "/clone_voice", files={"reference_audio_file": ("r.wav", _silence_wav(0.1), "audio/wav")}, data={"text": "hi"}
    )
    assert_error(short, 400, "reference_audio_file")
    too_long = server.client.post(
        "/clone_voice", data={"text": "hi", "reference_audio": base64.b64encode(_silence_wav(40.0, 8000)).decode()}
    )
    assert_error(too_long, 400, "reference_audio")
    bad_enum = server.client.post(
        "/clone_voice", files={"reference_audio_file": ("r.wav", ref, "audio/wav")}, data={"text": "hi", "speed": "x"}
    )
    assert_error(bad_enum, 400, "speed")
    text_as_file = server.client.post(
        "/clone_voice", files={"text": ("t.txt", b"hi", "text/plain"), "reference_audio_file": ("r.wav", ref)}
    )
    assert_error(text_as_file, 400, "text")


def test_body_and_upload_limits(server: Server) -> None:
    huge = server.client.post(
        "/v1/audio/speech",
        content=b'{"input": "' + b"a" * (MAX_UPLOAD * 2) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_error(huge, 413, None, "payload_too_large")
    big_file = server.client.post(
        "/clone_voice",
        files={"reference_audio_file": ("r.wav", b"\x00" * (MAX_UPLOAD + 10), "audio/wav")},
        data={"text": "hi"},
    )
    assert_error(big_file, 413, "reference_audio_file", "payload_too_large")
    over_body_limit = server.client.post(
        "/clone_voice",
        files={"reference_audio_file": ("r.wav", b"\x00" * (MAX_UPLOAD * 2), "audio/wav")},
        data={"text": "hi"},
    )
    assert_error(over_body_limit, 413, None, "payload_too_large")
    big_b64 = server.client.post(
        "/v1/audio/speech", json={"input": "hi", "voice": base64.b64encode(b"\x00" * (MAX_UPLOAD + 10)).decode()}
    )
    assert_error(big_b64, 413, "voice", "payload_too_large")


def test_overload_is_503_with_retry_after(server: Server) -> None:
    service = server.runtime.service
    original = service.max_queue
    service.max_queue = 0
    try:
        response = server.client.post("/speak", json={"name": "female", "text": "hi", "stream": True})
    finally:
        service.max_queue = original
    error = assert_error(response, 503, None, "overloaded")
    assert error["type"] == "server_overloaded"
    assert int(response.headers["retry-after"]) >= 1


def test_unexpected_error_does_not_leak(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[str]:
        raise RuntimeError("secret internal detail /etc/shadow")

    monkeypatch.setattr(server.runtime.service, "voice_names", broken)
    response = server.client.get("/audio_roles")
    error = assert_error(response, 500, None)
    assert "secret" not in response.text and "shadow" not in response.text
    assert error["type"] == "server_error"


def _fail_after_first_chunk(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection around the real service: one real chunk, then a generation error."""
    service = server.runtime.service
    original = service.synthesize

    async def synthesize(request):  # type: ignore[no-untyped-def]
        chunks = original(request)
        try:
            yield await chunks.__anext__()
        finally:
            await chunks.aclose()
        raise GenerationError("the model stopped producing audio")

    monkeypatch.setattr(service, "synthesize", synthesize)


def test_failure_mid_stream_ends_cleanly(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_after_first_chunk(server, monkeypatch)
    sse = server.client.post(
        "/v1/audio/speech",
        json={"input": "Hello.", "voice": "female", "stream_format": "sse", "response_format": "pcm"},
    )
    assert sse.status_code == 200
    events = [line for line in sse.text.split("\n\n") if line.strip()]
    assert events[0].startswith('data: {"type":"speech.audio.delta"')
    assert '"type":"speech.audio.error"' in events[-1] and "stopped producing audio" in events[-1]
    assert not any('"speech.audio.done"' in e for e in events)

    raw = server.client.post(
        "/speak", json={"name": "female", "text": "Hello.", "response_format": "wav", "stream": True}
    )
    assert raw.status_code == 200
    samples, rate = decode(raw.content, "wav")  # what arrived is a well-formed file
    assert rate == 16000 and samples.size > 0
    assert server.client.get("/ready").json()["active_requests"] == 0


def test_failure_before_first_chunk_is_json(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    async def synthesize(request):  # type: ignore[no-untyped-def]
        raise GenerationError("no semantic tokens were generated")
        yield  # pragma: no cover - makes this an async generator

    monkeypatch.setattr(server.runtime.service, "synthesize", synthesize)
    response = server.client.post("/speak", json={"name": "female", "text": "Hi.", "stream": True})
    assert_error(response, 500, None, "generation_failed")
