"""Audio routes end to end (real Spark engine, real torch backend): every format, streamed and not."""

from __future__ import annotations

import base64

import pytest

from tests.server.conftest import Server
from tests.server.helpers import decode, reference_wav

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
ENGINE_RATE = 16_000


def _check_audio(response, fmt: str, *, stream: bool, rate: int = ENGINE_RATE) -> float:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-sample-rate"] == str(rate)
    assert response.headers["content-disposition"] == f"attachment; filename=speech.{fmt}"
    if stream:
        assert "content-length" not in response.headers
    else:
        assert int(response.headers["content-length"]) == len(response.content)
    samples, decoded_rate = decode(response.content, fmt, pcm_rate=rate)
    # libopus always decodes at 48 kHz; the Ogg header keeps the input rate, X-Sample-Rate reports it.
    assert decoded_rate == (48_000 if fmt == "opus" else rate)
    duration = samples.shape[0] / decoded_rate
    assert 0.5 < duration < 20.0, duration
    assert float(abs(samples).max()) > 0.0
    return duration


@pytest.mark.parametrize("stream", [False, True], ids=["file", "stream"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_speak_every_format(server: Server, fmt: str, stream: bool) -> None:
    response = server.client.post(
        "/speak", json={"name": "female", "text": "Hello there.", "response_format": fmt, "stream": stream}
    )
    expected_type = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac"}
    expected_type |= {"wav": "audio/wav", "pcm": "audio/pcm"}
    assert response.headers["content-type"].startswith(expected_type[fmt])
    if fmt == "pcm":
        assert "rate=16000" in response.headers["content-type"]
    _check_audio(response, fmt, stream=stream)


def test_pcm_rates(server: Server) -> None:
    """pcm: 24 kHz on the OpenAI route (as OpenAI documents), the engine's 16 kHz natively, sample_rate overrides."""
    openai = server.client.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "male", "response_format": "pcm"}
    )
    assert openai.headers["content-type"] == "audio/pcm; rate=24000; channels=1"
    _check_audio(openai, "pcm", stream=True, rate=24_000)  # the OpenAI route streams by default

    override = server.client.post(
        "/v1/speak",
        json={"name": "male", "text": "Hi.", "response_format": "pcm", "sample_rate": 22_050},
    )
    _check_audio(override, "pcm", stream=False, rate=22_050)
    # Same audio at a different rate: durations agree.
    a = len(openai.content) / 2 / 24_000
    b = len(override.content) / 2 / 22_050
    assert abs(a - b) < 0.05


def test_openai_wav_file_and_voice_object(server: Server) -> None:
    response = server.client.post(
        "/v1/audio/speech",
        json={
            "model": "spark",
            "input": "Hello.",
            "voice": {"id": "female"},
            "response_format": "wav",
            "stream": False,
            "speed": 1.7,
            "instructions": "ignored",
            "unknown_extra": 1,
        },
    )
    assert response.content[:4] == b"RIFF"
    _check_audio(response, "wav", stream=False)


def test_multi_speak(server: Server) -> None:
    response = server.client.post(
        "/multi_speak",
        json={"text": "<role:female>Hello!<role:male,speed:high>Hi, how are you?", "response_format": "wav"},
    )
    duration = _check_audio(response, "wav", stream=False)
    single = server.client.post("/speak", json={"name": "female", "text": "Hello!", "response_format": "wav"})
    assert duration > _check_audio(single, "wav", stream=False) * 1.5  # two turns, one after the other


def test_clone_voice_upload_and_base64(server: Server) -> None:
    ref = reference_wav()
    upload = server.client.post(
        "/clone_voice",
        files={"reference_audio_file": ("ref.wav", ref, "audio/wav")},
        data={"text": "Cloned speech.", "reference_text": "a tone", "response_format": "flac", "pitch": ""},
    )
    _check_audio(upload, "flac", stream=False)
    # urlencoded (no file), base64 reference, streamed: the original accepted this too.
    encoded = base64.b64encode(ref).decode()
    as_form = server.client.post(
        "/v1/clone_voice",
        data={"text": "Cloned speech.", "reference_audio": encoded, "stream": "true", "response_format": "mp3"},
    )
    _check_audio(as_form, "mp3", stream=True)


def test_openai_clone_from_base64_voice(server: Server) -> None:
    voice = "data:audio/wav;base64," + base64.b64encode(reference_wav()).decode()
    response = server.client.post(
        "/v1/audio/speech", json={"input": "Hello.", "voice": voice, "response_format": "aac", "stream": False}
    )
    _check_audio(response, "aac", stream=False)
