"""The synthesis service: what every front end (HTTP routes, ``flashtts infer``) calls.

It knows no HTTP types. It resolves voices (built-in, stored role or uploaded reference), applies the
request limits, admits requests into a bounded queue, and hands validated :class:`SynthesisRequest` values
to the engine. Audio comes back as mono float32 arrays at ``engine.info.sample_rate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING

import msgspec

from flashtts_core.errors import (
    AudioDecodeError,
    InvalidRequestError,
    OverloadedError,
    UnsupportedFeatureError,
    VoiceNotFoundError,
)
from flashtts_core.plugins.types import ReferenceAudio, SynthesisRequest, VoiceInfo, VoicePrompt
from flashtts_core.text import DialogueTurn

if TYPE_CHECKING:
    import numpy as np

    from flashtts_core.plugins.base import EngineBase
    from flashtts_core.voices import VoiceStore

__all__ = ("SynthesisService",)

logger = logging.getLogger(__name__)

_REFERENCE_CACHE_SIZE = 64
_REFERENCE_CACHE_TTL = 600.0  # s: identical uploads within this window reuse their tokens


class SynthesisService:
    def __init__(self, engine: EngineBase, voices: VoiceStore, *, max_queue: int = 64) -> None:
        self.engine = engine
        self.voices = voices
        self.max_queue = max_queue
        self._active = 0
        self._ref_cache: OrderedDict[str, tuple[float, VoicePrompt]] = OrderedDict()

    # --- voices ----------------------------------------------------------------------------------------------

    @property
    def active_requests(self) -> int:
        return self._active

    def voice_names(self) -> list[str]:
        builtin = [v.name for v in self.engine.info.builtin_voices]
        return builtin + [n for n in self.voices.names() if n not in builtin]

    def voice_infos(self) -> list[VoiceInfo]:
        roles = [VoiceInfo(name=n, kind="role") for n in self.voices.names()]
        return list(self.engine.info.builtin_voices) + roles

    def resolve_voice(self, name: str | None, *, param: str = "name") -> tuple[str | None, VoicePrompt | None]:
        """(built-in voice, None) or (None, role prompt). ``None`` selects the engine's default voice."""
        info = self.engine.info
        if name is None or name == "":
            if info.default_voice is None:
                raise InvalidRequestError(
                    f"no voice given and the {info.name!r} engine has no default voice; "
                    f"use one of: {', '.join(self.voice_names()) or 'none (add one with /add_speaker)'}",
                    param=param,
                )
            return info.default_voice, None
        if any(v.name == name for v in info.builtin_voices):
            return name, None
        role = self.voices.get(name)
        if role is None or role.prompt is None:
            known = ", ".join(self.voice_names()) or "none"
            raise VoiceNotFoundError(f"unknown voice {name!r}; available voices: {known}", param=param)
        return None, role.prompt

    async def reference_prompt(self, reference: ReferenceAudio, *, param: str = "reference_audio") -> VoicePrompt:
        """The engine's prompt for an uploaded reference, reusing recent identical uploads."""
        if not self.engine.info.supports_cloning:
            raise UnsupportedFeatureError(
                f"the loaded {self.engine.info.name!r} engine does not support voice cloning; "
                f"use one of its voices: {', '.join(self.voice_names())}",
                param=param,
            )
        digest = hashlib.sha256()
        for part in (reference.data, (reference.text or "").encode(), reference.latent or b""):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        key = digest.hexdigest()
        now = time.monotonic()
        hit = self._ref_cache.get(key)
        if hit is not None and now - hit[0] < _REFERENCE_CACHE_TTL:
            self._ref_cache.move_to_end(key)
            return hit[1]
        with _reference_param(param):
            prompt = await self.engine.prepare_voice(reference)
        self._ref_cache[key] = (now, prompt)
        while len(self._ref_cache) > _REFERENCE_CACHE_SIZE:
            self._ref_cache.popitem(last=False)
        return prompt

    async def add_voice(self, name: str, reference: ReferenceAudio, *, param: str = "audio") -> None:
        """Store ``reference`` as the voice ``name``; audio problems are reported against ``param``."""
        if not self.engine.info.supports_cloning:
            raise UnsupportedFeatureError(
                f"the loaded {self.engine.info.name!r} engine does not support custom voices", param="name"
            )
        with _reference_param(param):
            wav = reference.data
            if not wav.startswith(b"RIFF"):
                wav = await asyncio.to_thread(_to_wav, reference.data)
            await self.voices.add(name, reference, audio_wav=wav)

    async def delete_voice(self, name: str) -> None:
        if not self.engine.info.supports_cloning:
            raise UnsupportedFeatureError(
                f"the loaded {self.engine.info.name!r} engine does not support custom voices", param="name"
            )
        await self.voices.delete(name)

    # --- synthesis -------------------------------------------------------------------------------------------

    def check_controls(self, request: SynthesisRequest) -> None:
        controls = self.engine.info.controls
        for field in ("pitch", "speed"):
            value = getattr(request, field)
            if value is not None and value != "moderate" and field not in controls:
                raise InvalidRequestError(
                    f"the {self.engine.info.name!r} engine does not support {field!r}; leave it out", param=field
                )

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[np.ndarray, None]:
        """Stream mono float32 audio. Admission and validation errors surface at the first ``__anext__``."""
        self.check_controls(request)
        if self._active >= self.max_queue:
            raise OverloadedError(
                f"the server is busy ({self._active} requests in progress); retry shortly", retry_after=1
            )
        self._active += 1
        try:
            # aclosing: when our consumer closes us (client gone), the engine's generator, and through it the
            # backend's, must stop now, not whenever the garbage collector finalises it.
            async with contextlib.aclosing(self.engine.synthesize(request)) as chunks:
                async for chunk in chunks:
                    if chunk.samples.size:
                        yield chunk.samples
        finally:
            self._active -= 1

    async def synthesize_dialogue(
        self, turns: list[DialogueTurn], base: SynthesisRequest
    ) -> AsyncGenerator[np.ndarray, None]:
        """Multi-speaker text: every turn in order with its own voice (all voices checked up front)."""
        if not turns:
            raise InvalidRequestError(
                "no dialogue found; write the text as <role:NAME>words<role:OTHER>words", param="text"
            )
        requests = []
        for i, turn in enumerate(turns):
            voice, prompt = self.resolve_voice(turn.name, param="text")
            requests.append(
                msgspec.structs.replace(
                    base,
                    request_id=f"{base.request_id}-{i}",
                    text=turn.text,
                    voice=voice,
                    prompt=prompt,
                    pitch=turn.pitch,
                    speed=turn.speed,
                )
            )
        for request in requests:
            async with contextlib.aclosing(self.synthesize(request)) as chunks:
                async for samples in chunks:
                    yield samples


@contextlib.contextmanager
def _reference_param(param: str) -> Iterator[None]:
    """Report reference-audio problems against the request field that carried the audio (the engine does not
    know whether it came as ``reference_audio_file``, ``audio`` or ``voice``)."""
    try:
        yield
    except AudioDecodeError as exc:
        exc.param = param
        raise


def _to_wav(data: bytes) -> bytes:
    """Store uploads in the original role layout (reference_audio.wav) whatever format they came in."""
    from flashtts_core.audio.decode import decode_audio
    from flashtts_core.audio.encode import encode_all

    rate = 24000
    samples = decode_audio(data, target_rate=rate)
    return encode_all(samples, "wav", input_rate=rate)
