"""The HTTP API on an Orpheus model (tiny scripted checkpoint, real torch backend): 24 kHz audio, the language's
voices and emotion tags, and clear 4xx for what Orpheus cannot do (cloning, pitch/speed)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from flashtts_core.config import ServerSettings
from flashtts_core.server import create_app
from flashtts_core.testing.checkpoints import tiny_checkpoint_dir
from tests.server.helpers import assert_error, decode, local_http, reference_wav, serve_bytes

REF = reference_wav(1.0)


@pytest.fixture(scope="module")
def orpheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = ServerSettings(
        model_path=str(tiny_checkpoint_dir("orpheus")),
        backend="torch",
        role_dir=str(tmp_path_factory.mktemp("orpheus-roles")),
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        allow_private_urls=True,  # so a URL voice would be fetched if the cloning check did not come first
    )
    with TestClient(create_app(settings), timeout=120) as client:
        yield client


def test_server_info(orpheus: TestClient) -> None:
    info = orpheus.get("/server_info").json()["info"]
    assert info["model"] == "orpheus" and info["sample_rate"] == 24000
    assert info["supports_cloning"] is False and info["controls"] == []
    assert "tara" in info["builtin_voices"]


def test_speech_with_a_voice_and_an_emotion_tag(orpheus: TestClient) -> None:
    for text in ("Hello there.", "Well <laugh> that is funny."):
        response = orpheus.post(
            "/v1/audio/speech", json={"input": text, "voice": "tara", "response_format": "wav", "stream": False}
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-sample-rate"] == "24000"
        samples, rate = decode(response.content, "wav")
        assert rate == 24000 and samples.size > 0
    native = orpheus.post("/speak", json={"name": "leah", "text": "Hi <sigh> there.", "response_format": "wav"})
    assert native.status_code == 200, native.text
    assert decode(native.content, "wav")[1] == 24000


def test_voices_languages_and_tags(orpheus: TestClient) -> None:
    body = orpheus.get("/v1/audio/voices").json()
    assert "tara" in body["voices"]
    assert body["languages"] == ["english"]
    assert "laugh" in body["tags"]
    tara = next(card for card in body["data"] if card["name"] == "tara")
    assert tara["kind"] == "builtin" and tara["language"] == "english"
    assert tara["tags"] == body["tags"]
    roles = orpheus.get("/audio_roles").json()["roles"]
    assert roles == body["voices"]


def test_cloning_routes_say_cloning_is_unsupported(orpheus: TestClient) -> None:
    ref_b64 = base64.b64encode(REF).decode()
    with local_http(serve_bytes(REF)) as target:
        cases = [
            orpheus.post("/clone_voice", data={"text": "hi", "reference_audio": target.url()}),
            orpheus.post("/clone_voice", data={"text": "hi"}, files={"reference_audio_file": ("r.wav", REF)}),
            orpheus.post("/add_speaker", data={"name": "mine", "audio": ref_b64}),
            orpheus.post("/add_speaker", data={"name": "mine"}, files={"audio_file": ("r.wav", REF)}),
            orpheus.post("/delete_speaker", data={"name": "tara"}),
            orpheus.post("/v1/audio/speech", json={"input": "hi", "voice": ref_b64}),
            orpheus.post("/v1/audio/speech", json={"input": "hi", "voice": target.url()}),
        ]
        for response in cases:
            error = assert_error(response, 400, code="unsupported_feature")
            assert "cloning" in error["message"] and "tara" in error["message"], error
            assert error["param"] in ("reference_audio", "name", "voice")
        assert target.requests == []  # nothing was downloaded
    assert "mine" not in orpheus.get("/audio_roles").json()["roles"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/audio/speech", {"input": "hi", "voice": "tara", "speed": 1.5}, "speed"),
        ("/v1/audio/speech", {"input": "hi", "voice": "tara", "pitch": 0.5}, "pitch"),
        ("/speak", {"name": "tara", "text": "hi", "pitch": "high"}, "pitch"),
        ("/speak", {"name": "tara", "text": "hi", "speed": "very_low"}, "speed"),
    ],
)
def test_pitch_and_speed_are_refused(orpheus: TestClient, path: str, body: dict, field: str) -> None:
    error = assert_error(orpheus.post(path, json=body), 400, field)
    assert field in error["message"]


def test_unknown_voice_lists_the_voices(orpheus: TestClient) -> None:
    error = assert_error(orpheus.post("/speak", json={"name": "nobody", "text": "hi"}), 404, "name", "voice_not_found")
    assert "tara" in error["message"] and "leah" in error["message"]
    error = assert_error(orpheus.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"}), 404, "voice")
    assert "tara" in error["message"]
