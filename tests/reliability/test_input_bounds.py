"""Every input is bounded, and the bound is decided before any model work: a 4xx that names the field.

``no_model_work`` makes any request that reaches the engine fail, so each refusal here is proven to happen
before synthesis or reference encoding starts.
"""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest

from flashtts_core.audio.encode import encode_all
from tests.reliability.conftest import MAX_UPLOAD
from tests.server.conftest import Server
from tests.server.helpers import assert_error, reference_wav

REF = reference_wav(1.0)
TEXT_ROUTES = [
    ("/speak", "json", {"name": "female"}, "text"),
    ("/v1/speak", "json", {"name": "female"}, "text"),
    ("/multi_speak", "json", {}, "text"),
    ("/v1/audio/speech", "json", {"voice": "female"}, "input"),
    ("/clone_voice", "form", {"reference_audio": base64.b64encode(REF).decode()}, "text"),
]


def _post(server: Server, path: str, kind: str, body: dict) -> object:
    if kind == "json":
        return server.client.post(path, json=body)
    return server.client.post(path, data=body)


def _long_wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        w.writeframes((0.2 * np.sin(2 * np.pi * 150 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(("path", "kind", "extra", "field"), TEXT_ROUTES)
def test_text_length_on_every_route(server: Server, no_model_work: list, path: str, kind: str, extra: dict, field: str):
    with server.settings_changed(max_text_chars=20):
        text = "<role:female>" + "a" * 30 if path == "/multi_speak" else "a" * 21
        response = _post(server, path, kind, {**extra, field: text})
        error = assert_error(response, 400, field, "text_too_long")
        assert "20" in error["message"]
    assert no_model_work == []


def test_reference_text_is_bounded(server: Server, no_model_work: list) -> None:
    with server.settings_changed(max_text_chars=20):
        for path, extra in (("/clone_voice", {"text": "hi"}), ("/add_speaker", {"name": "longtranscript"})):
            field = "reference_audio" if path == "/clone_voice" else "audio"
            body = {**extra, field: base64.b64encode(REF).decode(), "reference_text": "b" * 21}
            assert_error(server.client.post(path, data=body), 400, "reference_text", "text_too_long")
    assert no_model_work == []
    assert "longtranscript" not in server.client.get("/audio_roles").json()["roles"]


def test_segments_per_request(server: Server, no_model_work: list) -> None:
    service = server.runtime.service
    original = service.max_segments
    service.max_segments = 3
    try:
        five = "One. Two. Three. Four. Five."
        body = {"name": "female", "text": five, "length_threshold": 1, "window_size": 2}
        error = assert_error(server.client.post("/speak", json=body), 400, "text", "too_many_segments")
        assert "limit is 3" in error["message"]
        speech = {"input": five, "voice": "female", "length_threshold": 1, "window_size": 2}
        assert_error(server.client.post("/v1/audio/speech", json=speech), 400, "text", "too_many_segments")
        # A dialogue counts the segments of all its turns: 2 + 2 turns of two sentences each.
        dialogue = "<role:female>One. Two.<role:male>Three. Four."
        body = {"text": dialogue, "length_threshold": 1, "window_size": 2}
        assert_error(server.client.post("/multi_speak", json=body), 400, "text", "too_many_segments")
    finally:
        service.max_segments = original
    assert no_model_work == []


def test_segment_count_matches_the_engine(server: Server) -> None:
    """The service counts segments with the engine's own splitter and token counter."""
    from flashtts_core.plugins.types import SynthesisRequest
    from flashtts_core.text import split_text

    request = SynthesisRequest(request_id="n", text="One. Two. Three. Four.", length_threshold=1, window_size=2)
    counted = server.call(server.runtime.service.count_segments, request)
    tok = server.runtime.engine.tokenizer
    assert counted == len(split_text(request.text, count_tokens=tok.count_tokens, length_threshold=1, window_size=2))
    assert counted >= 2


def test_max_tokens_capped_by_context(server: Server, no_model_work: list) -> None:
    context = server.runtime.backend.capabilities.max_model_len
    for path, body in (
        ("/speak", {"name": "female", "text": "hi", "max_tokens": context + 1}),
        ("/v1/audio/speech", {"input": "hi", "voice": "female", "max_tokens": context + 1}),
        ("/multi_speak", {"text": "<role:female>hi", "max_tokens": context + 1}),
    ):
        error = assert_error(server.client.post(path, json=body), 400, "max_tokens")
        assert str(context) in error["message"]
    zero = {"name": "female", "text": "hi", "max_tokens": 0}
    assert_error(server.client.post("/speak", json=zero), 400, "max_tokens")
    assert no_model_work == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_json_numbers(server: Server, no_model_work: list, literal: str, field: str) -> None:
    body = f'{{"name": "female", "text": "hi", "{field}": {literal}}}'
    response = server.client.post("/speak", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, field)
    speech = f'{{"input": "hi", "voice": "female", "speed": {literal}}}'
    response = server.client.post("/v1/audio/speech", content=speech, headers={"content-type": "application/json"})
    assert_error(response, 400, "speed")
    assert no_model_work == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("top_p", "-inf"),
        ("top_p", "0"),
        ("top_k", "-1"),
        ("repetition_penalty", "nan"),
        ("max_tokens", "0"),
        ("length_threshold", "0"),
        ("window_size", "-5"),
        ("seed", "-1"),
        ("sample_rate", "100"),
    ],
)
def test_form_sampling_values(server: Server, no_model_work: list, field: str, value: str) -> None:
    body = {"text": "hi", "reference_audio": base64.b64encode(REF).decode(), field: value}
    assert_error(server.client.post("/clone_voice", data=body), 400, field)
    assert no_model_work == []


def test_upload_and_base64_sizes(server: Server, no_model_work: list) -> None:
    too_big = b"\0" * (MAX_UPLOAD + 1)
    added = server.client.post("/add_speaker", data={"name": "huge"}, files={"audio_file": ("a.wav", too_big)})
    assert_error(added, 413, "audio_file", "payload_too_large")
    as_b64 = base64.b64encode(too_big).decode()
    assert_error(server.client.post("/add_speaker", data={"name": "huge", "audio": as_b64}), 413, "audio")
    clone = server.client.post("/clone_voice", data={"text": "hi", "reference_audio": as_b64})
    assert_error(clone, 413, "reference_audio", "payload_too_large")
    assert no_model_work == []


def test_reference_duration(server: Server) -> None:
    """Longer than the engine's 30 s limit: refused while decoding, nothing stored (WAV and compressed)."""
    limit = server.runtime.engine.info.reference_max_seconds
    wav = _long_wav(limit + 5, rate=8000)
    assert len(wav) < MAX_UPLOAD
    clone = server.client.post("/clone_voice", data={"text": "hi"}, files={"reference_audio_file": ("r.wav", wav)})
    error = assert_error(clone, 400, "reference_audio_file", "audio_too_long")
    assert f"{limit:g} s" in error["message"] and "'reference_audio_file'" in error["message"]
    t = np.arange(int((limit + 5) * 16000)) / 16000
    flac = encode_all((0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), "flac", input_rate=16000)
    assert len(flac) < MAX_UPLOAD
    added = server.client.post("/add_speaker", data={"name": "toolong"}, files={"audio_file": ("r.flac", flac)})
    assert_error(added, 400, "audio_file", "audio_too_long")
    assert "toolong" not in server.client.get("/audio_roles").json()["roles"]
    assert not (server.role_dir / "toolong").exists()


def test_json_body_size_per_route(server: Server, no_model_work: list) -> None:
    """Text-only routes take what max_text_chars can need; the speech route keeps room for a base64 voice."""
    settings = server.state.settings
    padding = "x" * (settings.max_text_chars * 12 + 70_000)
    big = f'{{"name": "female", "text": "hi", "instructions": "{padding}"}}'
    response = server.client.post("/speak", content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, None, "payload_too_large")
    response = server.client.post("/multi_speak", content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, None, "payload_too_large")
    # The same size is fine on /v1/audio/speech (a reference clip travels as base64 there): the error is about
    # the voice, not the body size.
    speech = f'{{"input": "hi", "voice": "nobody", "instructions": "{padding}"}}'
    response = server.client.post("/v1/audio/speech", content=speech, headers={"content-type": "application/json"})
    assert_error(response, 404, "voice")
    assert no_model_work == []


def test_multipart_part_count(server: Server, no_model_work: list) -> None:
    from flashtts_core.server.app import FORM_PART_LIMIT

    files = [(f"field{i}", (None, "v")) for i in range(FORM_PART_LIMIT + 8)]
    response = server.client.post("/clone_voice", files=files)
    error = assert_error(response, 413, None, "too_many_parts")
    assert str(FORM_PART_LIMIT) in error["message"]
    assert no_model_work == []


def test_voice_name_length(server: Server, no_model_work: list) -> None:
    assert_error(server.client.post("/speak", json={"name": "n" * 65, "text": "hi"}), 400, "name")
    assert_error(server.client.post("/v1/audio/speech", json={"input": "hi", "voice": {"id": ""}}), 400, "voice")
    assert no_model_work == []
