"""OpenAI-compatible routes under ``/v1``: ``audio/speech``, ``models``, ``audio/voices``.

Compatibility choices (each one a complaint about the original or its peers):

* ``model`` accepts the served name and OpenAI's names (``tts-1``, ``tts-1-hd``, ``gpt-4o-mini-tts[-date]``),
  because many clients hard-code them; anything else is OpenAI's 404 ``model_not_found``.
* ``voice`` is a voice name, ``{"id": name}`` (OpenAI's custom-voice object), or reference audio to clone (an
  http(s) URL or base64). An unknown name is a 404 that lists the voices; it is never replaced by a default.
* ``speed`` (0.25-4.0) and the extra ``pitch`` map onto the engine's five levels.
* ``pcm`` is 24 kHz s16le mono as OpenAI documents (resampled), unless ``sample_rate`` says otherwise.
* ``stream_format: "sse"`` sends ``speech.audio.delta`` events with base64 audio, then ``speech.audio.done``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody

from flashtts_core.audio.formats import OPENAI_PCM_SAMPLE_RATE
from flashtts_core.config import ServerSettings
from flashtts_core.errors import InvalidRequestError, UnsupportedFeatureError
from flashtts_core.plugins.types import ReferenceAudio, SynthesisRequest, VoicePrompt
from flashtts_core.runtime import Runtime
from flashtts_core.server.context import synthesis_id
from flashtts_core.server.controllers.native import AUDIO_RESPONSES, ERROR_RESPONSES, respond_with_audio
from flashtts_core.server.errors import ModelNotFoundError
from flashtts_core.server.fetch import looks_like_url
from flashtts_core.server.inputs import check_text, level_from_float, load_reference_string, sampling_overrides
from flashtts_core.server.schemas import ModelCard, ModelList, SpeechRequest, VoiceCard, VoicesResponse

__all__ = ("MODEL_ALIASES", "OpenAIController", "check_model", "resolve_openai_voice")

logger = logging.getLogger(__name__)

MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# Voice names are at most 64 characters (see flashtts_core.voices), so longer strings can only be audio.
_MAX_NAME = 64


def _model_ids(runtime: Runtime) -> list[str]:
    return list(dict.fromkeys((runtime.model_name, *MODEL_ALIASES)))


def check_model(model: str | None, runtime: Runtime) -> None:
    """Accept the served name, the engine family and OpenAI's model names; 404 ``model_not_found`` otherwise."""
    if model is None or model in _model_ids(runtime) or model == runtime.engine.name:
        return
    if model.startswith("gpt-4o-mini-tts-"):  # dated snapshots
        return
    raise ModelNotFoundError(
        f"The model {model!r} does not exist on this server; use {runtime.model_name!r} "
        f"(or one of {', '.join(MODEL_ALIASES)})",
        param="model",
    )


async def resolve_openai_voice(
    voice: str | dict[str, Any] | None, runtime: Runtime, settings: ServerSettings
) -> tuple[str | None, VoicePrompt | None]:
    """(built-in voice, None) or (None, prompt) for the ``voice`` field (see the module docstring)."""
    service = runtime.service
    if isinstance(voice, dict):
        voice_id = voice.get("id")
        if not isinstance(voice_id, str) or not voice_id:
            raise InvalidRequestError("'voice' given as an object needs a string 'id'", param="voice")
        return service.resolve_voice(voice_id, param="voice")
    if voice is None or voice == "" or voice in service.voice_names():
        return service.resolve_voice(voice or None, param="voice")
    if looks_like_url(voice) or voice.startswith("data:") or len(voice) > _MAX_NAME:
        info = runtime.engine.info
        if not info.supports_cloning:
            raise UnsupportedFeatureError(
                f"the {info.name!r} engine does not support voice cloning, so 'voice' cannot be a URL or audio; "
                f"use one of its voices: {', '.join(service.voice_names())}",
                param="voice",
            )
        if info.requires_latent:
            raise UnsupportedFeatureError(
                f"the {info.name!r} engine needs a latent file to clone; use POST /clone_voice", param="voice"
            )
        data = await load_reference_string(voice, settings, param="voice")
        return None, await service.reference_prompt(ReferenceAudio(data=data), param="voice")
    return service.resolve_voice(voice, param="voice")


class OpenAIController(Controller):
    """OpenAI's speech API (tag "OpenAI compatible")."""

    path = "/"
    tags = ["OpenAI compatible"]  # noqa: RUF012 - Litestar reads a plain class attribute

    @post(
        "/audio/speech",
        status_code=200,
        summary="Create speech (OpenAI audio.speech.create)",
        description="OpenAI's body plus FlashTTS extras (pitch, sampling fields, length_threshold, window_size, "
        "stream, sample_rate). stream_format=sse answers text/event-stream with speech.audio.delta events.",
        responses={
            **AUDIO_RESPONSES,
            404: ResponseSpec(
                AUDIO_RESPONSES[404].data_container, generate_examples=False, description="Unknown model or voice"
            ),
        },
    )
    async def create_speech(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[SpeechRequest],
        runtime: NamedDependency[Runtime],
        settings: NamedDependency[ServerSettings],
    ) -> Response[Any]:
        check_model(data.model, runtime)
        text = check_text(data.input, settings, param="input")
        controls = runtime.engine.info.controls
        for field in ("speed", "pitch"):
            if getattr(data, field) != 1.0 and field not in controls:
                raise InvalidRequestError(
                    f"the {runtime.engine.info.name!r} engine does not support {field!r}; leave it out (or 1.0)",
                    param=field,
                    code="unsupported_feature",
                )
        voice, prompt = await resolve_openai_voice(data.voice, runtime, settings)
        synthesis = SynthesisRequest(
            request_id=synthesis_id(request),
            text=text,
            voice=voice,
            prompt=prompt,
            pitch=level_from_float(data.pitch),
            speed=level_from_float(data.speed),
            sampling=sampling_overrides(data),
            length_threshold=data.length_threshold,
            window_size=data.window_size,
            stream=data.stream,
        )
        output_rate = data.sample_rate
        if output_rate is None and data.response_format == "pcm":
            output_rate = OPENAI_PCM_SAMPLE_RATE
        sse = data.stream_format == "sse"
        return await respond_with_audio(
            request,
            runtime,
            settings,
            runtime.service.synthesize(synthesis),
            fmt=data.response_format,
            output_rate=output_rate,
            stream=data.stream or sse,
            sse=sse,
        )

    @get("/models", summary="List models (OpenAI shape)", sync_to_thread=False)
    def list_models(self, runtime: NamedDependency[Runtime], started_at: NamedDependency[int]) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started_at) for name in _model_ids(runtime)])

    @get(
        "/models/{model_id:str}",
        summary="Retrieve a model (OpenAI shape)",
        sync_to_thread=False,
        responses=ERROR_RESPONSES,
    )
    def get_model(
        self, model_id: FromPath[str], runtime: NamedDependency[Runtime], started_at: NamedDependency[int]
    ) -> ModelCard:
        check_model(model_id, runtime)
        return ModelCard(id=model_id, created=started_at)

    @get("/audio/voices", summary="List voices", sync_to_thread=False)
    def list_voices(self, runtime: NamedDependency[Runtime]) -> VoicesResponse:
        info = runtime.engine.info
        tags = list(info.tags)
        cards = [
            VoiceCard(
                id=v.name,
                name=v.name,
                kind=v.kind,
                language=v.language,
                description=v.description,
                # The engine's inline tags work with its built-in voices of the loaded language(s).
                tags=tags
                if tags and v.kind == "builtin" and (v.language is None or v.language in info.languages)
                else msgspec.UNSET,
            )
            for v in runtime.service.voice_infos()
        ]
        return VoicesResponse(voices=[c.name for c in cards], data=cards, languages=list(info.languages), tags=tags)
