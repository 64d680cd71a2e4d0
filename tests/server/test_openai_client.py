"""The official ``openai`` Python client, unchanged, against real uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import openai
import pytest

from tests.server.conftest import Server
from tests.server.helpers import decode


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_speech_create(client: openai.OpenAI) -> None:
    response = client.audio.speech.create(model="tts-1", voice="female", input="Hello from the SDK.")
    assert response.response.headers["content-type"] == "audio/mpeg"
    samples, rate = decode(response.content, "mp3")
    assert rate == 16000 and 0.5 < samples.size / rate < 20


def test_speech_streaming_response(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="male", input="Streaming.", response_format="pcm", speed=1.25
    ) as response:
        assert response.headers["x-sample-rate"] == "24000"
        assert "content-length" not in response.headers
        pieces = list(response.iter_bytes())
    body = b"".join(pieces)
    samples, rate = decode(body, "pcm", pcm_rate=24000)
    assert 0.5 < samples.size / rate < 20


def test_speech_sse(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="female",
        input="Events.",
        response_format="wav",
        extra_body={"stream_format": "sse"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    deltas = [e for e in events[:-1]]
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    samples, rate = decode(audio, "wav")
    assert rate == 16000 and samples.size > 8000


def test_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.audio.speech.create(model="tts-2", voice="female", input="hi")
    assert excinfo.value.code == "model_not_found"
    assert excinfo.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.speech.create(model="tts-1", voice="female", input="")
    assert bad.value.param == "input"
    assert next(m.id for m in client.models.list()) == "spark"


def test_sdk_with_api_key(server: Server) -> None:
    with server.settings_changed(api_key="sdk-key"):
        good = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sdk-key", max_retries=0)
        assert "tts-1" in [m.id for m in good.models.list()]
        bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="other", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_example_script(server: Server, tmp_path: Path) -> None:
    """examples/openai_client.py runs unchanged against the server."""
    path = Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"
    spec = importlib.util.spec_from_file_location("flashtts_openai_client_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mp3, pcm, wav = module.run(f"{server.base_url}/v1", tmp_path)
    assert decode(mp3.read_bytes(), "mp3")[1] == 16000
    assert decode(pcm.read_bytes(), "pcm", pcm_rate=24000)[0].size > 24000 // 2
    assert decode(wav.read_bytes(), "wav")[1] == 16000
