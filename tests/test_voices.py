"""Voice store: name rules, atomic persistence, restart, leftovers (engine prompts stubbed: unit level)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flashtts_core.errors import ConflictError, InvalidRequestError, VoiceNotFoundError
from flashtts_core.plugins.types import ReferenceAudio, VoicePrompt
from flashtts_core.voices import VoiceStore, validate_voice_name

CALLS: list[bytes] = []


async def _prepare(ref: ReferenceAudio) -> VoicePrompt:
    CALLS.append(ref.data)
    return VoicePrompt(engine="t", fingerprint="f1", data={"n": len(ref.data), "text": ref.text})


def _store(root: Path, fingerprint: str = "f1") -> VoiceStore:
    return VoiceStore(root, engine="t", fingerprint=fingerprint, prepare=_prepare, builtin=frozenset({"female"}))


@pytest.mark.parametrize("name", ["alice", "Donald Trump", "周杰伦", "a.b-c_d", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_voice_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../evil", "..", "a/b", "a\\b", "a\x00b", "a\nb", ".hidden", "trailing ", " lead", "x" * 65, "CON", "nul.txt",
     "a..b", "tab\tname", "emoji😀"],
)  # fmt: skip
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_voice_name(name)
    assert info.value.param == "name"


async def test_add_list_delete_and_restart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.load()
    await store.add("alice", ReferenceAudio(data=b"RIFFaudio", text="hello"))
    assert store.names() == ["alice"]
    folder = tmp_path / "alice"
    assert (folder / "reference_audio.wav").read_bytes() == b"RIFFaudio"
    assert (folder / "reference_text.txt").read_text() == "hello"
    with pytest.raises(ConflictError):
        await store.add("alice", ReferenceAudio(data=b"x"))
    with pytest.raises(ConflictError):
        await store.add("female", ReferenceAudio(data=b"x"))

    CALLS.clear()
    again = _store(tmp_path)
    await again.load()
    assert again.names() == ["alice"]
    assert CALLS == []  # cached prompt reused
    role = again.get("alice")
    assert role is not None and role.prompt is not None and role.prompt.data["text"] == "hello"

    await again.delete("alice")
    assert again.names() == [] and not folder.exists()
    with pytest.raises(VoiceNotFoundError):
        await again.delete("alice")
    with pytest.raises(InvalidRequestError):
        await again.delete("female")


async def test_stale_prompt_is_recomputed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.load()
    await store.add("bob", ReferenceAudio(data=b"RIFFbob"))
    CALLS.clear()
    other = _store(tmp_path, fingerprint="f2")
    await other.load()
    assert CALLS == [b"RIFFbob"]


async def test_original_layout_and_leftovers(tmp_path: Path) -> None:
    (tmp_path / "李靖").mkdir()
    (tmp_path / "李靖" / "reference_audio.wav").write_bytes(b"RIFFx")
    (tmp_path / "李靖" / "reference_text.txt").write_text("你可知为什么人们都怕你？\n", encoding="utf-8")
    (tmp_path / "no-audio").mkdir()
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".tmp-deadbeef" / "reference_audio.wav").write_bytes(b"half")
    store = _store(tmp_path)
    await store.load()
    assert store.names() == ["李靖"]
    role = store.get("李靖")
    assert role is not None and role.text == "你可知为什么人们都怕你？"
    assert not (tmp_path / ".tmp-deadbeef").exists()


async def test_concurrent_adds_of_one_name(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.load()
    results = await asyncio.gather(
        *(store.add("same", ReferenceAudio(data=b"RIFF%d" % i)) for i in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, ConflictError) for r in results if isinstance(r, Exception))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]  # noqa: ASYNC240 - test inspection
