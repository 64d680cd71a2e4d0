"""Wire schemas of the HTTP API: one msgspec Struct per request and response body.

Field names and defaults are those of the original FlashTTS server document, so existing clients keep working.
Constraints live in the types (``Annotated[..., Meta(...)]``) so that they are enforced at decode time *and*
appear in the OpenAPI document (Litestar does not read Struct docstrings, hence ``description=`` in ``Meta``).

Unknown-field policy: every request body **tolerates unknown fields**. The OpenAI SDKs send extras
(``instructions``, ``stream_format`` on old servers, ...) that must not break a request, and the original native
routes ignored unknown fields too, so strict bodies would break clients that work against the original server.
The cost is that a misspelt optional field is silently ignored.

Sampling fields default to ``None``: "use the engine's default". Sending the original's literal defaults
(``temperature=0.9``...) instead would make backends that lack a sampling feature reject requests that never
asked for it, and would override per-family defaults (Orpheus needs a repetition penalty of at least 1.1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from flashtts_core.audio.formats import ResponseFormat
from flashtts_core.plugins.types import Level

__all__ = (
    "AddSpeakerForm",
    "CloneVoiceForm",
    "DeleteSpeakerForm",
    "ErrorBody",
    "ErrorDetail",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "MultiSpeakRequest",
    "ReadyResponse",
    "RolesResponse",
    "ServerInfo",
    "ServerInfoResponse",
    "SpeakRequest",
    "SpeakerResponse",
    "SpeechRequest",
    "VoiceCard",
    "VoicesResponse",
)

# --- reusable field types --------------------------------------------------------------------------------------

Text = Annotated[str, Meta(description="Text to synthesise.", examples=["Hello, world!"])]
LevelField = Annotated[
    Level,
    Meta(description="Discrete level: very_low, low, moderate, high or very_high (Spark only)."),
]
Temperature = Annotated[
    float, Meta(ge=0.0, le=5.0, description="Sampling temperature (0 = greedy). Engine default when omitted (0.9).")
]
TopK = Annotated[int, Meta(ge=0, le=10_000, description="Top-k sampling (0 = off). Engine default when omitted (50).")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0, description="Nucleus sampling threshold. Engine default when omitted.")]
RepetitionPenalty = Annotated[
    float, Meta(gt=0.0, le=10.0, description="Repetition penalty (1 = off). Engine default when omitted.")
]
MaxTokens = Annotated[
    int,
    Meta(ge=1, le=1_000_000, description="Most LLM tokens to generate per segment (fitted to the model context)."),
]
LengthThreshold = Annotated[
    int, Meta(ge=1, le=100_000, description="Texts longer than this many LLM tokens are split into segments.")
]
WindowSize = Annotated[int, Meta(ge=1, le=100_000, description="Target segment length in LLM tokens when splitting.")]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1, description="Sampling seed for reproducible output (if supported).")]
SampleRate = Annotated[
    int,
    Meta(
        ge=8_000,
        le=48_000,
        description="Output sample rate in Hz (moved to the nearest rate the codec supports). Default: the "
        "engine's rate, or 24000 for pcm on /v1/audio/speech.",
    ),
]
Format = Annotated[
    ResponseFormat, Meta(description="Audio format of the response: mp3, opus (Ogg), aac (ADTS), flac, wav or pcm.")
]
Stream = Annotated[bool, Meta(description="Stream audio as it is generated (chunked) instead of one complete file.")]
VoiceName = Annotated[str, Meta(min_length=1, max_length=64, description="A voice (role) name.")]
ReferenceString = Annotated[
    str, Meta(description="Reference audio as an http(s) URL or a base64 string (a data: URL prefix is accepted).")
]
ReferenceText = Annotated[str, Meta(description="Transcript of the reference audio (improves cloning).")]
FileUpload = Annotated[bytes, Meta(description="An uploaded file (multipart).")]


class _Synthesis(msgspec.Struct, kw_only=True):
    """Fields shared by every native synthesis route (``/speak``, ``/multi_speak``, ``/clone_voice``)."""

    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None
    length_threshold: LengthThreshold = 50
    window_size: WindowSize = 50
    seed: Seed | None = None
    stream: Stream = False
    response_format: Format = "mp3"
    sample_rate: SampleRate | None = None


# --- native requests -------------------------------------------------------------------------------------------


class SpeakRequest(_Synthesis, kw_only=True):
    """``POST /speak``: synthesise with a built-in voice or a stored role."""

    name: Annotated[
        str,
        Meta(min_length=1, max_length=64, description="Voice: a built-in voice or a role added with /add_speaker."),
    ]
    text: Text
    pitch: LevelField | None = None
    speed: LevelField | None = None


class MultiSpeakRequest(_Synthesis, kw_only=True):
    """``POST /multi_speak``: dialogue text with ``<role:NAME[,pitch:P][,speed:S]>`` tags."""

    text: Annotated[
        str,
        Meta(
            description="Dialogue: each turn starts with <role:NAME>, optionally <role:NAME,pitch:high,speed:low>.",
            examples=["<role:female>Hello!<role:male>Hi, how are you?"],
        ),
    ]


class CloneVoiceForm(_Synthesis, kw_only=True):
    """``POST /clone_voice`` (multipart or urlencoded form): zero-shot cloning from a reference recording."""

    text: Text
    reference_audio: ReferenceString | None = None
    reference_audio_file: FileUpload | None = None
    reference_text: ReferenceText | None = None
    latent_file: Annotated[bytes, Meta(description="MegaTTS3 .npy latent of the reference audio.")] | None = None
    pitch: LevelField | None = None
    speed: LevelField | None = None


class AddSpeakerForm(msgspec.Struct, kw_only=True):
    """``POST /add_speaker`` (multipart form): store a named voice."""

    name: VoiceName
    audio: ReferenceString | None = None
    audio_file: FileUpload | None = None
    reference_text: ReferenceText | None = None
    latent_file: Annotated[bytes, Meta(description="MegaTTS3 .npy latent of the reference audio.")] | None = None


class DeleteSpeakerForm(msgspec.Struct, kw_only=True):
    """``POST /delete_speaker`` (multipart or urlencoded form)."""

    name: VoiceName


# --- OpenAI request ----------------------------------------------------------------------------------------------


class SpeechRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/audio/speech``: OpenAI's body plus the original FlashTTS extras."""

    input: Annotated[str, Meta(description="Text to synthesise (OpenAI allows up to 4096 characters).")]
    model: (
        Annotated[
            str,
            Meta(description="The served model name (see /v1/models) or tts-1, tts-1-hd, gpt-4o-mini-tts."),
        ]
        | None
    ) = None
    voice: (
        Annotated[
            str | dict[str, Any],
            Meta(
                description='A voice name, {"id": name}, or reference audio to clone (http(s) URL or base64). '
                "Omitted: the engine's default voice."
            ),
        ]
        | None
    ) = None
    response_format: Format = "mp3"
    speed: Annotated[
        float, Meta(ge=0.25, le=4.0, description="0.25-4.0; mapped onto the engine's five speed levels.")
    ] = 1.0
    stream_format: Annotated[
        Literal["audio", "sse"],
        Meta(description="audio: raw audio bytes; sse: server-sent speech.audio.delta / speech.audio.done events."),
    ] = "audio"
    instructions: Annotated[str, Meta(description="Accepted for compatibility; ignored.")] | None = None
    # Original FlashTTS extras.
    pitch: Annotated[
        float, Meta(ge=0.25, le=4.0, description="0.25-4.0; mapped onto the engine's five pitch levels (Spark).")
    ] = 1.0
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None
    length_threshold: LengthThreshold = 50
    window_size: WindowSize = 50
    seed: Seed | None = None
    stream: Annotated[
        bool, Meta(description="Stream audio as it is generated (default true, as in the original server).")
    ] = True
    sample_rate: SampleRate | None = None


# --- responses ---------------------------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """The one error shape of every route (OpenAI's)."""

    error: ErrorDetail


class RolesResponse(msgspec.Struct, kw_only=True):
    success: bool
    roles: list[str]


class SpeakerResponse(msgspec.Struct, kw_only=True):
    success: bool
    role: str


class ServerInfo(msgspec.Struct, kw_only=True):
    model: Annotated[str, Meta(description="Engine family (spark, orpheus, mega).")]
    model_name: Annotated[str, Meta(description="Name served on /v1/models (--model_name).")]
    backend: str
    roles: list[str]
    builtin_voices: list[str]
    default_voice: str | None
    sample_rate: Annotated[int, Meta(description="Native sample rate of the engine (Hz); pcm uses it on /speak.")]
    supports_cloning: bool
    requires_latent: bool
    controls: list[str]
    response_formats: list[str]
    max_text_chars: int
    max_upload_bytes: int
    version: str


class ServerInfoResponse(msgspec.Struct, kw_only=True):
    success: bool
    info: ServerInfo


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "flashtts"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard] = []


class VoiceCard(msgspec.Struct, kw_only=True):
    id: str
    name: str
    kind: Literal["builtin", "role"]
    language: str | None = None
    description: str | None = None
    # Only present for voices that understand inline tags (left out, not empty, elsewhere).
    tags: (
        Annotated[
            list[str],
            Meta(description="Inline tags this voice understands in the text (Orpheus emotions, e.g. <laugh>)."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class VoicesResponse(msgspec.Struct, kw_only=True):
    voices: Annotated[list[str], Meta(description="Voice names (the original shape).")]
    data: Annotated[list[VoiceCard], Meta(description="The same voices with details.")]
    languages: Annotated[list[str], Meta(description="Languages of the loaded model (empty: not stated).")] = []
    tags: Annotated[list[str], Meta(description="Inline tags of the loaded model and language (empty for Spark).")] = []


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str


class ReadyResponse(msgspec.Struct, kw_only=True):
    status: str
    model: str
    backend: str
    running: int
    waiting: int
    active_requests: int
