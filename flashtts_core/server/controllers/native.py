"""The original FlashTTS routes: ``/speak``, ``/multi_speak``, ``/clone_voice``, voice management, server info.

Names, fields and response shapes are those of the original server document; what changed is behind them:
validated bodies, 4xx (not 500) for client mistakes, one error envelope, and real streaming.
The controller is registered twice, at ``/`` and under ``/v1`` (the original document promised ``/v1/...``).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from flashtts_core import __version__
from flashtts_core.audio.formats import RESPONSE_FORMATS
from flashtts_core.config import ServerSettings
from flashtts_core.plugins.types import SynthesisRequest
from flashtts_core.runtime import Runtime
from flashtts_core.server.context import request_id, request_started, synthesis_id
from flashtts_core.server.forms import form_operation, read_form
from flashtts_core.server.inputs import check_reference_text, check_text, load_reference, sampling_overrides
from flashtts_core.server.responses import audio_response
from flashtts_core.server.schemas import (
    AddSpeakerForm,
    CloneVoiceForm,
    DeleteSpeakerForm,
    ErrorBody,
    MultiSpeakRequest,
    RolesResponse,
    ServerInfo,
    ServerInfoResponse,
    SpeakerResponse,
    SpeakRequest,
)
from flashtts_core.server.state import server_state
from flashtts_core.text import parse_multi_speaker

__all__ = ("AUDIO_RESPONSES", "ERROR_RESPONSES", "NativeController", "respond_with_audio")

logger = logging.getLogger(__name__)

_CLONE_FILES = frozenset({"reference_audio_file", "latent_file"})
_ADD_FILES = frozenset({"audio_file", "latent_file"})

ERROR_RESPONSES: dict[int, ResponseSpec] = {
    400: ResponseSpec(
        ErrorBody, generate_examples=False, description="Invalid request (the field is named in error.param)"
    ),
    401: ResponseSpec(ErrorBody, generate_examples=False, description="Missing or wrong API key (with --api_key)"),
    404: ResponseSpec(ErrorBody, generate_examples=False, description="Unknown voice or model"),
    413: ResponseSpec(ErrorBody, generate_examples=False, description="Upload or body too large"),
    503: ResponseSpec(
        ErrorBody, generate_examples=False, description="Model not ready, or server busy (see Retry-After)"
    ),
    504: ResponseSpec(
        ErrorBody, generate_examples=False, description="The synthesis did not start within --request_timeout"
    ),
}
AUDIO_RESPONSES: dict[int, ResponseSpec] = {
    200: ResponseSpec(
        bytes,
        media_type="audio/mpeg",
        description="Audio in response_format (audio/mpeg, audio/ogg; codecs=opus, audio/aac, audio/flac, "
        "audio/wav or audio/pcm; rate=N; channels=1). X-Sample-Rate gives the sample rate. Streamed (chunked) "
        "when stream=true, else one complete file with Content-Length.",
        generate_examples=False,
    ),
    **ERROR_RESPONSES,
}


async def respond_with_audio(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    settings: ServerSettings,
    chunks: Any,
    *,
    fmt: str,
    output_rate: int | None,
    stream: bool,
    sse: bool = False,
) -> Response[Any]:
    """:func:`audio_response` with what every synthesis route passes: the request's id, start time, time
    budget (``--request_timeout``), disconnect watch and metrics."""
    started = request_started(request)
    metrics = server_state(request).metrics
    route = request.scope.get("path_template") or request.url.path
    sample_rate = runtime.engine.info.sample_rate
    return await audio_response(
        chunks,
        input_rate=sample_rate,
        fmt=fmt,
        output_rate=output_rate,
        stream=stream,
        sse=sse,
        request_id=request_id(request),
        time_limit=settings.request_timeout,
        receive=request.receive,
        started=started,
        tracker=metrics.tracker(route, sample_rate, started) if metrics is not None else None,
    )


def _synthesis_request(
    runtime: Runtime, data: Any, *, text: str, voice: str | None = None, prompt: Any = None, request_id: str
) -> SynthesisRequest:
    return SynthesisRequest(
        request_id=request_id,
        text=text,
        voice=voice,
        prompt=prompt,
        pitch=getattr(data, "pitch", None),
        speed=getattr(data, "speed", None),
        sampling=sampling_overrides(data),
        length_threshold=data.length_threshold,
        window_size=data.window_size,
        stream=data.stream,
    )


class NativeController(Controller):
    """FlashTTS's own API (tag "FlashTTS")."""

    path = "/"
    tags = ["FlashTTS"]  # noqa: RUF012 - Litestar reads a plain class attribute

    @get("/server_info", summary="Server and model information", sync_to_thread=False)
    def server_info(
        self, runtime: NamedDependency[Runtime], settings: NamedDependency[ServerSettings]
    ) -> ServerInfoResponse:
        info = runtime.engine.info
        return ServerInfoResponse(
            success=True,
            info=ServerInfo(
                model=info.name,
                model_name=runtime.model_name,
                backend=runtime.backend.name,
                roles=runtime.service.voice_names(),
                builtin_voices=[v.name for v in info.builtin_voices],
                default_voice=info.default_voice,
                sample_rate=info.sample_rate,
                supports_cloning=info.supports_cloning,
                requires_latent=info.requires_latent,
                controls=sorted(info.controls),
                response_formats=list(RESPONSE_FORMATS),
                max_text_chars=settings.max_text_chars,
                max_upload_bytes=settings.max_upload_bytes,
                version=__version__,
            ),
        )

    @get("/audio_roles", summary="List voices (built-in voices and stored roles)", sync_to_thread=False)
    def audio_roles(self, runtime: NamedDependency[Runtime]) -> RolesResponse:
        return RolesResponse(success=True, roles=runtime.service.voice_names())

    @post(
        "/add_speaker",
        status_code=200,
        summary="Add a voice (role) from a reference recording",
        description="multipart/form-data: name, and audio (URL or base64) or audio_file; optional reference_text "
        "(transcript) and latent_file (MegaTTS3). 409 if the name exists, 400 for an invalid name or audio.",
        operation_class=form_operation(AddSpeakerForm, file_fields=_ADD_FILES),
        responses={
            **ERROR_RESPONSES,
            409: ResponseSpec(ErrorBody, generate_examples=False, description="A voice with that name exists"),
        },
    )
    async def add_speaker(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        settings: NamedDependency[ServerSettings],
    ) -> SpeakerResponse:
        runtime.service.require_cloning(param="name")  # before reading (or downloading) any audio
        data = await read_form(
            request, AddSpeakerForm, file_fields=_ADD_FILES, max_file_bytes=settings.max_upload_bytes
        )
        check_reference_text(data.reference_text, settings)
        reference = await load_reference(
            text_value=data.audio,
            file_value=data.audio_file,
            reference_text=data.reference_text,
            latent=data.latent_file,
            settings=settings,
            text_param="audio",
            file_param="audio_file",
            requires_latent=runtime.engine.info.requires_latent,
        )
        await runtime.service.add_voice(data.name, reference, param="audio_file" if data.audio_file else "audio")
        logger.info("voice %r added", data.name)
        return SpeakerResponse(success=True, role=data.name)

    @post(
        "/delete_speaker",
        status_code=200,
        summary="Delete a stored voice (role)",
        description="Form field name (multipart or urlencoded). 404 if unknown; built-in voices cannot be deleted.",
        operation_class=form_operation(DeleteSpeakerForm),
        responses=ERROR_RESPONSES,
    )
    async def delete_speaker(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
    ) -> SpeakerResponse:
        runtime.service.require_cloning(param="name")
        data = await read_form(request, DeleteSpeakerForm, file_fields=frozenset(), max_file_bytes=0)
        await runtime.service.delete_voice(data.name)
        logger.info("voice %r deleted", data.name)
        return SpeakerResponse(success=True, role=data.name)

    @post(
        "/clone_voice",
        status_code=200,
        summary="Synthesise in the voice of a reference recording (zero-shot cloning)",
        description="multipart/form-data (urlencoded also works without files): text, and reference_audio (URL "
        "or base64) or reference_audio_file; optional reference_text, pitch, speed, sampling fields, "
        "stream, response_format, sample_rate.",
        operation_class=form_operation(CloneVoiceForm, file_fields=_CLONE_FILES),
        responses=AUDIO_RESPONSES,
    )
    async def clone_voice(
        self,
        request: Request[Any, Any, Any],
        runtime: NamedDependency[Runtime],
        settings: NamedDependency[ServerSettings],
    ) -> Response[Any]:
        runtime.service.require_cloning(param="reference_audio")  # before reading (or downloading) any audio
        data = await read_form(
            request, CloneVoiceForm, file_fields=_CLONE_FILES, max_file_bytes=settings.max_upload_bytes
        )
        text = check_text(data.text, settings, param="text")
        check_reference_text(data.reference_text, settings)
        reference = await load_reference(
            text_value=data.reference_audio,
            file_value=data.reference_audio_file,
            reference_text=data.reference_text,
            latent=data.latent_file,
            settings=settings,
            text_param="reference_audio",
            file_param="reference_audio_file",
            requires_latent=runtime.engine.info.requires_latent,
        )
        param = "reference_audio_file" if data.reference_audio_file is not None else "reference_audio"
        prompt = await runtime.service.reference_prompt(reference, param=param)
        synthesis = _synthesis_request(runtime, data, text=text, prompt=prompt, request_id=synthesis_id(request))
        return await respond_with_audio(
            request,
            runtime,
            settings,
            runtime.service.synthesize(synthesis),
            fmt=data.response_format,
            output_rate=data.sample_rate,
            stream=data.stream,
        )

    @post(
        "/speak",
        status_code=200,
        summary="Synthesise with a built-in voice or a stored role",
        responses=AUDIO_RESPONSES,
    )
    async def speak(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[SpeakRequest],
        runtime: NamedDependency[Runtime],
        settings: NamedDependency[ServerSettings],
    ) -> Response[Any]:
        text = check_text(data.text, settings, param="text")
        voice, prompt = runtime.service.resolve_voice(data.name, param="name")
        synthesis = _synthesis_request(
            runtime, data, text=text, voice=voice, prompt=prompt, request_id=synthesis_id(request)
        )
        return await respond_with_audio(
            request,
            runtime,
            settings,
            runtime.service.synthesize(synthesis),
            fmt=data.response_format,
            output_rate=data.sample_rate,
            stream=data.stream,
        )

    @post(
        "/multi_speak",
        status_code=200,
        summary="Synthesise a dialogue: <role:NAME> tags switch voices",
        responses=AUDIO_RESPONSES,
    )
    async def multi_speak(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[MultiSpeakRequest],
        runtime: NamedDependency[Runtime],
        settings: NamedDependency[ServerSettings],
    ) -> Response[Any]:
        text = check_text(data.text, settings, param="text")
        turns = parse_multi_speaker(text)
        base = _synthesis_request(runtime, data, text=text, request_id=synthesis_id(request))
        return await respond_with_audio(
            request,
            runtime,
            settings,
            runtime.service.synthesize_dialogue(turns, base),
            fmt=data.response_format,
            output_rate=data.sample_rate,
            stream=data.stream,
        )
