"""The voice (role) store: named references on disk in the original layout, plus cached engine prompts.

Layout (the original's, so existing ``data/roles`` folders work unchanged)::

    <role_dir>/<name>/reference_audio.wav    # any audio file is accepted on load
    <role_dir>/<name>/reference_text.txt     # optional transcript
    <role_dir>/<name>/reference_latent.npy   # MegaTTS3 latent (also any *.npy)
    <role_dir>/<name>/flashtts_prompt.json   # cached engine tokens (ours; recomputed if stale)

Writes are atomic: a role is assembled in a hidden temporary folder (every file fsynced) and renamed into
place, so a crash at any moment leaves either the complete role or nothing; leftovers are removed at start-up.
No pickle anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from flashtts_core.errors import ConflictError, InvalidRequestError, VoiceNotFoundError
from flashtts_core.plugins.types import ReferenceAudio, VoicePrompt

__all__ = ("Role", "VoiceStore", "validate_voice_name")

logger = logging.getLogger(__name__)

_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm")
_PROMPT_FILE = "flashtts_prompt.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_ALLOWED_PUNCT = set(" -_.")


def validate_voice_name(name: str, *, param: str = "name") -> str:
    """Return the NFC-normalised name or raise a 400 naming the rule it breaks.

    Allowed: 1-64 characters of unicode letters, digits, space and ``-_.``; not ``.``/``..`` sequences that
    could escape the role directory, no leading/trailing space or dot, no reserved device names."""
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("the voice name is empty", param=param)
    name = unicodedata.normalize("NFC", name)
    if len(name) > 64:
        raise InvalidRequestError("the voice name is longer than 64 characters", param=param)
    for ch in name:
        if not (ch.isalnum() or ch in _ALLOWED_PUNCT) or unicodedata.category(ch).startswith("C"):
            raise InvalidRequestError(
                f"the voice name contains {ch!r}; use letters, digits, space, '-', '_' or '.'", param=param
            )
    if ".." in name or name[0] in " ." or name[-1] in " .":
        raise InvalidRequestError(
            "the voice name may not start or end with '.' or space, nor contain '..'", param=param
        )
    if name.split(".")[0].strip().lower() in _RESERVED:
        raise InvalidRequestError(f"{name!r} is a reserved device name", param=param)
    return name


class Role(msgspec.Struct, kw_only=True):
    name: str
    path: Path
    text: str | None = None
    prompt: VoicePrompt | None = None


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _find_audio(folder: Path) -> Path | None:
    preferred = folder / "reference_audio.wav"
    if preferred.is_file():
        return preferred
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in _AUDIO_SUFFIXES:
            return p
    return None


def _remove_leftovers(name: str, folder: Path) -> None:
    """Delete what an interrupted prompt-cache write left inside a role folder (start-up only)."""
    for leftover in folder.glob(f"{_TMP_PREFIX}*"):
        logger.warning("removing incomplete file %s/%s (an earlier write was interrupted)", name, leftover.name)
        leftover.unlink(missing_ok=True)


def _find_latent(folder: Path) -> Path | None:
    preferred = folder / "reference_latent.npy"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in folder.glob("*.npy") if p.is_file())
    return found[0] if found else None


PrepareFn = Callable[[ReferenceAudio], Awaitable[VoicePrompt]]


class VoiceStore:
    """Named voices of one engine. ``prepare`` turns a reference into the engine's prompt (codec tokens);
    prompts are computed once per role and cached on disk with the engine's fingerprint."""

    def __init__(
        self, role_dir: Path | None, *, engine: str, fingerprint: str, prepare: PrepareFn, builtin: frozenset[str]
    ) -> None:
        self.role_dir = role_dir
        self._engine = engine
        self._fingerprint = fingerprint
        self._prepare = prepare
        self._builtin = builtin
        self._roles: dict[str, Role] = {}
        self._lock = asyncio.Lock()

    # --- start-up --------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load every complete role of ``role_dir``; prompts missing or stale are computed and cached."""
        if self.role_dir is None:
            return
        self.role_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.role_dir.iterdir()):
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                logger.warning("removing incomplete voice leftover %s (an earlier write was interrupted)", entry.name)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                name = validate_voice_name(entry.name)
            except InvalidRequestError:
                logger.warning("skipping role folder %r: not a valid voice name", entry.name)
                continue
            try:
                role = await self._load_role(name, entry)
            except Exception as exc:
                logger.warning("skipping role %r: %s", name, exc)
                continue
            if role is not None:
                self._roles[name] = role
        logger.info("loaded %d voice(s) from %s", len(self._roles), self.role_dir)

    async def _load_role(self, name: str, folder: Path) -> Role | None:
        _remove_leftovers(name, folder)
        audio = _find_audio(folder)
        if audio is None:
            logger.warning("skipping role %r: no reference audio in %s", name, folder)
            return None
        text_file = folder / "reference_text.txt"
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else None
        prompt = self._read_prompt(folder)
        if prompt is None:
            latent = _find_latent(folder)
            ref = ReferenceAudio(
                data=audio.read_bytes(), text=text or None, latent=latent.read_bytes() if latent else None
            )
            prompt = await self._prepare(ref)
            self._write_prompt(folder, prompt)
        return Role(name=name, path=folder, text=text or None, prompt=prompt)

    def _read_prompt(self, folder: Path) -> VoicePrompt | None:
        path = folder / _PROMPT_FILE
        if not path.is_file():
            return None
        try:
            prompt = msgspec.json.decode(path.read_bytes(), type=VoicePrompt)
        except (msgspec.DecodeError, OSError):
            return None
        if prompt.engine != self._engine or prompt.fingerprint != self._fingerprint:
            return None
        return prompt

    def _write_prompt(self, folder: Path, prompt: VoicePrompt) -> None:
        tmp = folder / f"{_TMP_PREFIX}{uuid.uuid4().hex}.json"
        try:
            _fsync_write(tmp, msgspec.json.encode(prompt))
            os.replace(tmp, folder / _PROMPT_FILE)
            _fsync_dir(folder)
        except OSError as exc:  # a read-only role folder still works, only uncached
            logger.warning("could not cache the prompt of %s: %s", folder.name, exc)
            tmp.unlink(missing_ok=True)

    # --- queries ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._roles)

    def get(self, name: str) -> Role | None:
        return self._roles.get(name)

    # --- mutations -------------------------------------------------------------------------------------------

    async def add(self, name: str, reference: ReferenceAudio, *, audio_wav: bytes | None = None) -> Role:
        """Add a role. ``audio_wav`` is what gets stored as ``reference_audio.wav`` (defaults to the upload)."""
        name = validate_voice_name(name)
        if name in self._builtin:
            raise ConflictError(f"{name!r} is a built-in voice; choose another name", param="name")
        if name in self._roles:
            raise ConflictError(f"a voice named {name!r} already exists; delete it first", param="name")
        prompt = await self._prepare(reference)  # validates the audio before anything is written
        async with self._lock:
            if name in self._roles:
                raise ConflictError(f"a voice named {name!r} already exists; delete it first", param="name")
            folder = await asyncio.to_thread(self._write_role, name, reference, audio_wav, prompt)
            role = Role(name=name, path=folder, text=reference.text, prompt=prompt)
            self._roles[name] = role
        return role

    def _write_role(self, name: str, reference: ReferenceAudio, audio_wav: bytes | None, prompt: VoicePrompt) -> Path:
        if self.role_dir is None:
            raise InvalidRequestError("voices cannot be added: the server has no role directory", param="name")
        self.role_dir.mkdir(parents=True, exist_ok=True)
        final = self.role_dir / name
        if final.exists():
            raise ConflictError(f"a folder named {name!r} already exists in the role directory", param="name")
        tmp = self.role_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _fsync_write(tmp / "reference_audio.wav", audio_wav if audio_wav is not None else reference.data)
            if reference.text:
                _fsync_write(tmp / "reference_text.txt", reference.text.encode("utf-8"))
            if reference.latent is not None:
                _fsync_write(tmp / "reference_latent.npy", reference.latent)
            _fsync_write(tmp / _PROMPT_FILE, msgspec.json.encode(prompt))
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.role_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    async def delete(self, name: str) -> None:
        if name in self._builtin:
            raise InvalidRequestError(f"{name!r} is a built-in voice and cannot be deleted", param="name")
        async with self._lock:
            role = self._roles.get(name)
            if role is None:
                raise VoiceNotFoundError(f"no voice named {name!r}", param="name")
            await asyncio.to_thread(self._remove_folder, role.path)
            del self._roles[name]

    def _remove_folder(self, folder: Path) -> None:
        if not folder.exists():
            return
        trash = folder.parent / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(folder, trash)  # atomic: the role disappears at once, cleanup can be interrupted safely
        _fsync_dir(folder.parent)
        shutil.rmtree(trash, ignore_errors=True)
