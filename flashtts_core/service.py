"""The synthesis service: what every front end (HTTP routes, ``flashtts infer``) calls.

It knows no HTTP types. It resolves voices (built-in, stored role or uploaded reference), applies the
request limits, admits requests into a bounded queue, and hands validated :class:`SynthesisRequest` values
to the engine. Audio comes back as mono float32 arrays at ``engine.info.sample_rate``.

Limits decided before any model work (each error names the request field):

* ``max_tokens`` above the model context (the backend's ``max_model_len``) → 400 ``max_tokens``;
* more than ``max_segments`` LLM generations for one request (the text is split exactly as the engine will
  split it, using the engine's own token counter; a dialogue counts all its turns) → 400 ``text``;
* pitch/speed on an engine without those controls → 400 naming the field;
* admission: at most ``max_queue`` units of work in progress — syntheses, and also the codec work of preparing
  an uploaded reference or adding a voice — beyond which :class:`OverloadedError` (503 + ``Retry-After``) is
  raised at once, never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import msgspec

from flashtts_core.errors import (
    AudioDecodeError,
    InvalidRequestError,
    OverloadedError,
    UnsupportedFeatureError,
    VoiceNotFoundError,
)
from flashtts_core.plugins.types import ReferenceAudio, SynthesisRequest, VoiceInfo, VoicePrompt
from flashtts_core.text import DialogueTurn, split_text

if TYPE_CHECKING:
    import numpy as np

    from flashtts_core.plugins.base import EngineBase
    from flashtts_core.voices import VoiceStore

__all__ = ("SynthesisService",)

logger = logging.getLogger(__name__)

_REFERENCE_CACHE_SIZE = 64
_REFERENCE_CACHE_TTL = 600.0  # s: identical uploads within this window reuse their tokens
_SPLIT_IN_THREAD_CHARS = 1024  # longer texts are split for counting in a worker thread (the loop stays free)
DEFAULT_MAX_SEGMENTS = 256
# Below this many tokens, a generation that yields no audio at all is blamed on the client's max_tokens (400).


class SynthesisService:
    def __init__(
        self, engine: EngineBase, voices: VoiceStore, *, max_queue: int = 64, max_segments: int = DEFAULT_MAX_SEGMENTS
    ) -> None:
        self.engine = engine
        self.voices = voices
        self.max_queue = max_queue
        self.max_segments = max_segments
        self._active = 0
        self._ref_cache: OrderedDict[str, tuple[float, VoicePrompt]] = OrderedDict()

    # --- admission -------------------------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise :class:`OverloadedError` (503) at once when every ``max_queue`` slot is taken."""
        if self._active >= self.max_queue:
            raise OverloadedError(
                f"the server is busy ({self._active} requests in progress); retry shortly", retry_after=1
            )

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_queue`` slots, or raise :class:`OverloadedError` (503) at once."""
        self.check_capacity()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

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
        self.require_cloning(param=param)
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
        with self.admitted(), _reference_param(param):
            prompt = await self.engine.prepare_voice(reference)
        self._ref_cache[key] = (now, prompt)
        while len(self._ref_cache) > _REFERENCE_CACHE_SIZE:
            self._ref_cache.popitem(last=False)
        return prompt

    async def add_voice(self, name: str, reference: ReferenceAudio, *, param: str = "audio") -> None:
        """Store ``reference`` as the voice ``name``; audio problems are reported against ``param``."""
        self.require_cloning(param="name")
        with self.admitted(), _reference_param(param):
            wav = reference.data
            if not wav.startswith(b"RIFF"):
                info = self.engine.info
                wav = await asyncio.to_thread(_to_wav, reference.data, info.reference_max_seconds, param)
            await self.voices.add(name, reference, audio_wav=wav)

    async def delete_voice(self, name: str) -> None:
        self.require_cloning(param="name")
        await self.voices.delete(name)

    def require_cloning(self, *, param: str) -> None:
        """400 ``unsupported_feature`` unless the engine clones voices (custom voices need cloning too)."""
        info = self.engine.info
        if not info.supports_cloning:
            raise UnsupportedFeatureError(
                f"the loaded {info.name!r} engine does not support voice cloning, so it has no custom voices to "
                f"add, delete or clone from; use one of its voices: {', '.join(self.voice_names()) or 'none'}",
                param=param,
            )

    # --- synthesis -------------------------------------------------------------------------------------------

    def check_controls(self, request: SynthesisRequest) -> None:
        controls = self.engine.info.controls
        for field in ("pitch", "speed"):
            value = getattr(request, field)
            if value is not None and value != "moderate" and field not in controls:
                raise InvalidRequestError(
                    f"the {self.engine.info.name!r} engine does not support {field!r}; leave it out", param=field
                )

    def check_max_tokens(self, request: SynthesisRequest) -> None:
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            return
        context = self.engine.backend.capabilities.max_model_len
        if max_tokens > context:
            raise InvalidRequestError(
                f"'max_tokens' is {max_tokens} but the model context is {context} tokens (prompt included); "
                f"ask for at most {context} or leave it out",
                param="max_tokens",
                code="invalid_value",
            )

    def _token_counter(self) -> Callable[[str], int] | None:
        """The engine's own LLM token counter (``count_tokens`` on the engine or on its ``tokenizer``)."""
        for owner in (self.engine, getattr(self.engine, "tokenizer", None)):
            count = getattr(owner, "count_tokens", None)
            if callable(count):
                return count  # type: ignore[no-any-return]
        return None

    async def count_segments(self, request: SynthesisRequest) -> int | None:
        """How many LLM generations the engine will run for ``request`` (``None``: the engine cannot say)."""
        count = self._token_counter()
        if count is None:
            return None

        def split() -> int:
            return len(
                split_text(
                    request.text,
                    count_tokens=count,
                    length_threshold=request.length_threshold,
                    window_size=request.window_size,
                )
            )

        if len(request.text) > _SPLIT_IN_THREAD_CHARS:
            return await anyio.to_thread.run_sync(split)
        return split()

    def _too_many_segments(self, segments: int) -> InvalidRequestError:
        return InvalidRequestError(
            f"the text would be split into {segments} segments; the limit is {self.max_segments} per request. "
            "Raise 'window_size' / 'length_threshold', or send the text in several requests.",
            param="text",
            code="too_many_segments",
        )

    async def check_request(self, request: SynthesisRequest) -> None:
        """Every limit of one synthesis (see the module docstring); raises the 4xx naming the field, or the 503
        of a full server before the text is even split."""
        self.check_controls(request)
        self.check_max_tokens(request)
        self.check_capacity()
        segments = await self.count_segments(request)
        if segments is not None and segments > self.max_segments:
            raise self._too_many_segments(segments)

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[np.ndarray, None]:
        """Stream mono float32 audio. Admission and validation errors surface at the first ``__anext__``."""
        await self.check_request(request)
        with self.admitted():
            async for samples in self._run(request):
                yield samples

    async def _run(self, request: SynthesisRequest) -> AsyncGenerator[np.ndarray, None]:
        # aclosing: when our consumer closes us (client gone), the engine's generator, and through it the backend's,
        # must stop now, not whenever the garbage collector finalises it.
        async with contextlib.aclosing(self.engine.synthesize(request)) as chunks:
            async for chunk in chunks:
                if chunk.samples.size:
                    yield chunk.samples

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
        total = 0
        for request in requests:
            self.check_controls(request)
            self.check_max_tokens(request)
        self.check_capacity()
        for request in requests:
            segments = await self.count_segments(request)
            total += segments or 0
            if total > self.max_segments:
                raise self._too_many_segments(total)
        # One admission slot for the whole dialogue: a busy server answers 503 before the first turn, never
        # in the middle of the audio.
        with self.admitted():
            for request in requests:
                async with contextlib.aclosing(self._run(request)) as chunks:
                    async for samples in chunks:
                        yield samples


@contextlib.contextmanager
def _reference_param(param: str) -> Iterator[None]:
    """Report reference-audio problems against the request field that carried the audio (the engine does not
    know whether it came as ``reference_audio_file``, ``audio`` or ``voice``)."""
    try:
        yield
    except AudioDecodeError as exc:
        if exc.param and exc.param != param:  # the message names the field the engine assumed
            exc.message = exc.message.replace(f"'{exc.param}'", f"'{param}'")
            exc.args = (exc.message,)
        exc.param = param
        raise


def _to_wav(data: bytes, max_seconds: float | None = None, param: str | None = None) -> bytes:
    """Store uploads in the original role layout (reference_audio.wav) whatever format they came in. Decoding stops
    just past ``max_seconds`` (a long upload is refused before it is decoded whole)."""
    from flashtts_core.audio.decode import decode_audio
    from flashtts_core.audio.encode import encode_all

    rate = 24000
    samples = decode_audio(data, target_rate=rate, max_seconds=max_seconds, param=param)
    return encode_all(samples, "wav", input_rate=rate)
