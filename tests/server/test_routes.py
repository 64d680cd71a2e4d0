"""Information routes, the web page, documentation, probes and ``--api_key``."""

from __future__ import annotations

import pytest

from tests.server.conftest import Server
from tests.server.helpers import assert_error


def test_info_routes(server: Server) -> None:
    for path in ("/audio_roles", "/v1/audio_roles"):
        body = server.client.get(path).json()
        assert body["success"] is True
        assert body["roles"][:2] == ["female", "male"]
    info = server.client.get("/server_info").json()
    assert info["success"] is True
    assert info["info"]["model"] == "spark" and info["info"]["sample_rate"] == 16000
    assert info["info"]["roles"][:2] == ["female", "male"]
    voices = server.client.get("/v1/audio/voices").json()
    assert voices["voices"][:2] == ["female", "male"]
    assert voices["data"][0] == {
        "id": "female",
        "name": "female",
        "kind": "builtin",
        "language": None,
        "description": voices["data"][0]["description"],
    }
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "spark" and "tts-1" in ids
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models["data"])
    assert server.client.get("/v1/models/tts-1-hd").json()["id"] == "tts-1-hd"
    assert_error(server.client.get("/v1/models/whisper-1"), 404, "model", "model_not_found")


def test_health_ready(server: Server) -> None:
    assert server.client.get("/health").json() == {"status": "ok"}
    ready = server.client.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["backend"] == "torch" and body["running"] == 0


def test_page_static_and_docs(server: Server) -> None:
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert server.client.get("/static/index.html").status_code == 200
    assert server.client.get("/static/../app.py").status_code == 404
    docs = server.client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text and "https://" not in docs.text.split("<script>")[1]  # no CDN
    schema = server.client.get("/openapi.json").json()
    assert schema["info"]["title"] == "FlashTTS"
    paths = schema["paths"]
    for path in ("/speak", "/multi_speak", "/clone_voice", "/add_speaker", "/delete_speaker", "/v1/audio/speech"):
        assert "post" in paths[path], path
    clone_body = paths["/clone_voice"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert clone_body["properties"]["reference_audio_file"]["format"] == "binary"
    speech = schema["components"]["schemas"]["SpeechRequest"]["properties"]
    assert speech["speed"]["maximum"] == 4.0
    assert server.client.get("/docs/openapi.json").status_code == 200


PUBLIC = ("/", "/static/index.html", "/health", "/ready", "/docs", "/openapi.json")


def test_api_key(server: Server) -> None:
    key = "s3cret-key"
    with server.settings_changed(api_key=key):
        for path in ("/audio_roles", "/v1/audio_roles", "/v1/models", "/server_info"):
            response = server.client.get(path)
            assert_error(response, 401, None, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = server.client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401)
        basic = server.client.get("/v1/models", headers={"Authorization": f"Basic {key}"})
        assert_error(basic, 401)
        post = server.client.post("/speak", json={"name": "female", "text": "hi"})
        assert_error(post, 401)
        ok = server.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert server.client.get("/audio_roles", headers={"authorization": f"bearer {key}"}).status_code == 200
        for path in PUBLIC:
            assert server.client.get(path).status_code == 200, path
    assert server.client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("path", ["/speak", "/v1/audio/speech", "/add_speaker"])
def test_api_key_checked_before_body(server: Server, path: str) -> None:
    with server.settings_changed(api_key="k"):
        response = server.client.post(path, content=b"x" * 100, headers={"content-type": "application/json"})
        assert_error(response, 401)
