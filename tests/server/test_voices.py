"""Voice management: add → use → list → delete, persisted in the role directory."""

from __future__ import annotations

import base64

import pytest

from flashtts_core.voices import VoiceStore
from tests.server.conftest import Server
from tests.server.helpers import assert_error, decode, reference_wav


def _reload_names(server: Server) -> list[str]:
    """A fresh store on the same folder (what a restarted server would load)."""
    engine = server.runtime.engine

    async def load() -> list[str]:
        store = VoiceStore(
            server.role_dir,
            engine=engine.name,
            fingerprint=engine.fingerprint,
            prepare=engine.prepare_voice,
            builtin=frozenset(v.name for v in engine.info.builtin_voices),
        )
        await store.load()
        return store.names()

    return server.call(load)


def test_add_use_delete_round_trip(server: Server) -> None:
    ref = reference_wav()
    added = server.client.post(
        "/add_speaker",
        files={"audio_file": ("alice.wav", ref, "audio/wav")},
        data={"name": "alice", "reference_text": "a gliding tone"},
    )
    assert added.status_code == 200, added.text
    assert added.json() == {"success": True, "role": "alice"}
    folder = server.role_dir / "alice"
    assert (folder / "reference_audio.wav").is_file()
    assert (folder / "reference_text.txt").read_text(encoding="utf-8") == "a gliding tone"
    assert "alice" in _reload_names(server)
    assert "alice" in server.client.get("/audio_roles").json()["roles"]
    assert "alice" in server.client.get("/v1/audio/voices").json()["voices"]

    assert_error(
        server.client.post("/add_speaker", files={"audio_file": ("a.wav", ref, "audio/wav")}, data={"name": "alice"}),
        409,
        "name",
    )
    speech = server.client.post(
        "/v1/audio/speech", json={"input": "Hi.", "voice": "alice", "response_format": "wav", "stream": False}
    )
    assert speech.status_code == 200
    assert decode(speech.content, "wav")[1] == 16000

    deleted = server.client.post("/v1/delete_speaker", data={"name": "alice"})  # urlencoded
    assert deleted.json() == {"success": True, "role": "alice"}
    assert not folder.exists()
    assert "alice" not in _reload_names(server)
    assert_error(server.client.post("/delete_speaker", files={"name": (None, "alice")}), 404, "name")  # multipart


def test_add_from_base64(server: Server) -> None:
    encoded = base64.b64encode(reference_wav(1.5)).decode()
    response = server.client.post("/add_speaker", files={"name": (None, "bob")}, data={"audio": encoded})
    assert response.status_code == 200, response.text
    assert server.client.post("/delete_speaker", data={"name": "bob"}).status_code == 200


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "x" * 65, "con", "a<b>"])
def test_bad_names(server: Server, name: str) -> None:
    response = server.client.post(
        "/add_speaker", files={"audio_file": ("a.wav", reference_wav(1.0), "audio/wav")}, data={"name": name}
    )
    assert_error(response, 400, "name")
    assert not any(p.name.startswith(".tmp") for p in server.role_dir.iterdir())


def test_add_delete_rules(server: Server) -> None:
    ref = reference_wav(1.0)
    assert_error(
        server.client.post("/add_speaker", files={"audio_file": ("a.wav", ref, "audio/wav")}, data={"name": "female"}),
        409,
        "name",
    )
    assert_error(server.client.post("/add_speaker", files={"name": (None, "carol")}), 400, "audio")
    both = server.client.post(
        "/add_speaker",
        files={"audio_file": ("a.wav", ref, "audio/wav")},
        data={"name": "carol", "audio": base64.b64encode(ref).decode()},
    )
    assert_error(both, 400, "audio_file")
    bad_audio = server.client.post(
        "/add_speaker", files={"audio_file": ("a.wav", b"not audio" * 10, "audio/wav")}, data={"name": "carol"}
    )
    assert_error(bad_audio, 400, "audio_file", "invalid_audio")
    assert not (server.role_dir / "carol").exists()
    assert_error(server.client.post("/delete_speaker", data={"name": "female"}), 400, "name")
    assert_error(server.client.post("/delete_speaker", data={}), 400, "name")
    assert_error(server.client.post("/delete_speaker", data={"name": "nobody"}), 404, "name")
