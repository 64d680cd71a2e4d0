"""Base classes every backend and engine plugin derives from.

A **backend** turns prompt token ids into a stream of generated token-id deltas; it never sees text or audio.
An **engine** turns a synthesis request into mono float32 PCM chunks using a backend; it never imports a runtime.

The bases implement the parts of the contract that are the same for everyone, so plugins cannot get them
wrong: request validation before the first token (unsupported sampling, prompt too long, not started), the
running-request count behind ``health()``, idempotent ``shutdown()`` and option validation.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from flashtts_core.errors import (
    BackendNotReadyError,
    InvalidRequestError,
    PromptTooLongError,
    UnsupportedSamplingError,
)
from flashtts_core.plugins.types import (
    OPTIONAL_SAMPLING_FIELDS,
    AudioChunk,
    BackendCapabilities,
    BackendConfig,
    BackendHealth,
    EngineConfig,
    EngineInfo,
    GenerationRequest,
    ReferenceAudio,
    SynthesisRequest,
    TokenChunk,
    VoicePrompt,
)

__all__ = ("BACKEND_API_VERSION", "ENGINE_API_VERSION", "BackendBase", "EngineBase", "NoOptions")

logger = logging.getLogger(__name__)

BACKEND_API_VERSION = 1
ENGINE_API_VERSION = 1


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options schema of a plugin that takes none."""


def _convert_options(cls: type, options: dict[str, Any]) -> Any:
    schema: type[msgspec.Struct] = cls.Options
    try:
        return msgspec.convert(options, schema, strict=False)
    except msgspec.ValidationError as exc:
        known = ", ".join(schema.__struct_fields__) or "none"
        raise InvalidRequestError(
            f"invalid option for {cls.kind} {cls.name!r}: {exc} (known options: {known})", param="backend_option"
        ) from exc


class BackendBase(abc.ABC):
    """Base of every LLM backend.

    Subclasses set ``name``, implement ``startup()`` (load weights; blocking work off the event loop),
    ``capabilities`` and ``_generate()``; optionally ``_shutdown()`` and ``check_available()``.
    ``_generate`` receives an already validated request whose ``max_tokens`` fits the context, and must:
    decode greedily when ``temperature == 0`` (mandatory, whatever ``capabilities.sampling`` declares);
    yield deltas; end with exactly one chunk carrying the finish reason; never include stop ids; abort the
    work in the runtime when the generator is closed or its task cancelled (put that in ``finally``).
    """

    kind: ClassVar[str] = "backend"
    name: ClassVar[str] = ""
    api_version: ClassVar[int] = BACKEND_API_VERSION
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.options = _convert_options(type(self), dict(config.options))
        self._started = False
        self._stopped = False
        self._running = 0
        # Monotonic counts over the backend's life, for /metrics (LLM tokens/s): prompt ids of validated requests
        # and generated ids streamed to consumers (stop ids are never streamed, so never counted).
        self.prompt_tokens = 0
        self.generated_tokens = 0

    @classmethod
    def check_available(cls) -> str | None:
        """``None`` when the runtime can be used here, else a one-line reason with the fix. Must stay cheap:
        only ``importlib.util.find_spec`` and platform checks, no imports of the runtime."""
        return None

    # --- lifecycle -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def startup(self) -> None:
        """Load the model. Subclasses call ``await super().startup()`` at the end (marks the backend ready)."""
        self._started = True
        self._stopped = False

    async def shutdown(self) -> None:
        """Free the runtime. Idempotent, and safe after a failed ``startup()``."""
        if self._stopped:
            return
        self._stopped = True
        self._started = False
        await self._shutdown()

    async def _shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources (override)."""

    async def __aenter__(self) -> BackendBase:
        await self.startup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def ready(self) -> bool:
        return self._started

    @property
    def loads_out_of_process(self) -> bool:
        """Whether ``startup()`` loads the model in another process (and so mostly waits): the server then loads the
        engine's own models at the same time. ``False`` (the default) keeps the two loads one after the other."""
        return False

    @property
    @abc.abstractmethod
    def capabilities(self) -> BackendCapabilities:
        """What this backend honours; valid after ``startup()``."""

    async def health(self) -> BackendHealth:
        if self._started:
            status = "ready"
        elif self._stopped:
            status = "stopped"
        else:
            status = "starting"
        return BackendHealth(status=status, running=self._running)

    # --- generation ------------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Reject what this backend cannot do; return the request with ``max_tokens`` fitted to the context."""
        if not self._started:
            raise BackendNotReadyError(f"backend {self.name!r} is not started")
        caps = self.capabilities
        sampling = request.sampling
        for field, off in OPTIONAL_SAMPLING_FIELDS.items():
            value = getattr(sampling, field)
            if field == "temperature" and value == 0.0:
                continue  # greedy decoding is mandatory for every backend
            if field not in caps.sampling and value != off:
                raise UnsupportedSamplingError(
                    f"the {self.name!r} backend does not support the sampling parameter {field!r}", param=field
                )
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt_token_ids")
        vocab = caps.vocab_size
        if vocab is not None:
            # An id the model cannot embed would fail (or read garbage) inside the runtime, taking its batch along.
            prompt = request.prompt_token_ids
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise InvalidRequestError(
                    f"prompt_token_ids must be in [0, {vocab}) for this model", param="prompt_token_ids"
                )
            allowed = sampling.allowed_token_ids
            if allowed is not None and (not allowed or min(allowed) < 0 or max(allowed) >= vocab):
                raise InvalidRequestError(
                    f"allowed_token_ids must be a non-empty set of ids in [0, {vocab})", param="allowed_token_ids"
                )
        room = caps.max_model_len - n_prompt
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens but the model context is {caps.max_model_len} tokens; "
                "shorten the text (or split it) or raise --max_length",
                param="input",
            )
        if sampling.max_tokens > room:
            request = msgspec.structs.replace(request, sampling=msgspec.structs.replace(sampling, max_tokens=room))
        return request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream generated ids for ``request``. Validation errors surface at the first ``__anext__``."""
        request = self.validate(request)
        self.prompt_tokens += len(request.prompt_token_ids)
        self._running += 1
        # aclosing: when our consumer closes us (or is cancelled while we are suspended at ``yield``), the inner
        # generator must run its ``finally`` (the runtime abort) now, not whenever it is garbage-collected.
        try:
            async with contextlib.aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    self.generated_tokens += len(chunk.token_ids)
                    yield chunk
        finally:
            self._running -= 1

    @abc.abstractmethod
    def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Runtime-specific generation (an ``async def`` generator)."""


class EngineBase(abc.ABC):
    """Base of every TTS engine (one per model family).

    Subclasses set ``name``, implement ``detect()``, ``llm_dir()``, ``startup()``, ``info`` and ``synthesize()``,
    and, if they can clone, ``prepare_voice()``.
    """

    kind: ClassVar[str] = "engine"
    name: ClassVar[str] = ""
    api_version: ClassVar[int] = ENGINE_API_VERSION
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, config: EngineConfig, backend: BackendBase) -> None:
        self.config = config
        self.backend = backend
        self.options = _convert_options(type(self), dict(config.options))
        self._started = False

    @classmethod
    def check_available(cls) -> str | None:
        return None

    @classmethod
    @abc.abstractmethod
    def detect(cls, model_dir: Path) -> bool:
        """Whether ``model_dir`` holds a checkpoint of this family (cheap: directory listing only)."""

    @classmethod
    def llm_dir(cls, model_dir: Path) -> Path:
        """The Hugging Face-layout LLM folder inside ``model_dir`` that the backend loads."""
        return model_dir

    @classmethod
    def default_role_dir(cls) -> str | None:
        """Where roles live when ``--role_dir`` is not given (``None``: the family has no roles)."""
        return None

    async def startup(self) -> None:
        """Load codec weights etc. Subclasses call ``await super().startup()`` at the end."""
        self._started = True

    async def shutdown(self) -> None:
        """Idempotent. Does not shut the backend down (its owner does)."""
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    def fingerprint(self) -> str:
        """Identifies the codec weights; cached voice prompts from other weights are recomputed."""
        return f"{self.name}-1"

    async def prepare_voice(self, reference: ReferenceAudio) -> VoicePrompt:
        """Turn a reference into the engine's voice prompt (e.g. codec tokens)."""
        from flashtts_core.errors import UnsupportedFeatureError

        raise UnsupportedFeatureError(f"the {self.name!r} engine cannot clone voices", param="reference_audio")

    @abc.abstractmethod
    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Mono float32 PCM chunks at ``info.sample_rate`` (an ``async def`` generator)."""

    async def warmup(self) -> None:
        """One short synthesis so the first real request does not pay for lazy initialisation."""
        voice = self.info.default_voice
        request = SynthesisRequest(request_id="warmup", text="warm up", voice=voice)
        async for _ in self.synthesize(request):
            pass
