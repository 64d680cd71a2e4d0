"""Values passed between the layers: service → engine → backend and back.

Everything here is a frozen msgspec Struct (cheap, immutable, validated when decoded). Backends see only
:class:`GenerationRequest` / :class:`TokenChunk`; engines see :class:`SynthesisRequest` / :class:`AudioChunk`.
No heavy imports: numpy is only named for typing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

if TYPE_CHECKING:
    import numpy as np

__all__ = (
    "FIRST_AUDIO",
    "LATER_AUDIO",
    "OPTIONAL_SAMPLING_FIELDS",
    "AudioChunk",
    "BackendCapabilities",
    "BackendConfig",
    "BackendHealth",
    "EngineConfig",
    "EngineInfo",
    "FinishReason",
    "GenerationRequest",
    "Level",
    "ReferenceAudio",
    "SamplingOverrides",
    "SamplingParams",
    "SynthesisRequest",
    "TokenChunk",
    "VoiceInfo",
    "VoicePrompt",
)

FinishReason = Literal["stop", "length", "abort"]
Level = Literal["very_low", "low", "moderate", "high", "very_high"]

FiniteNonNeg = Annotated[float, Meta(ge=0.0, le=100.0)]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a backend samples with. Defaults mean "feature off" so a backend that lacks a feature can tell
    whether a request actually needs it (see :data:`OPTIONAL_SAMPLING_FIELDS`)."""

    max_tokens: Annotated[int, Meta(ge=1)] = 2048
    temperature: FiniteNonNeg = 1.0  # 0 = greedy
    top_k: Annotated[int, Meta(ge=0)] = 0  # 0 = disabled
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Restricts sampling to these ids (engines keep the LLM inside the audio vocabulary + stop ids).
    allowed_token_ids: frozenset[int] | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")


# Sampling fields a backend may or may not honour, with their "off" value. max_tokens and stop_token_ids are
# mandatory for every backend.
OPTIONAL_SAMPLING_FIELDS: dict[str, object] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "allowed_token_ids": None,
}


#: ``GenerationRequest.priority`` of the generation that a request's first audio waits for.
FIRST_AUDIO = 0
#: ``GenerationRequest.priority`` of a request's later segments (their audio is needed only after earlier ones').
LATER_AUDIO = 1


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # Scheduling hint, lower first: FIRST_AUDIO for the generation a request's first audio waits for, LATER_AUDIO for
    # its later segments. A backend that queues work beyond its batch admits by (priority, arrival), so that under
    # load a new request does not wait behind other requests' later segments; one that cannot may ignore it.
    priority: Annotated[int, Meta(ge=0, le=1000)] = FIRST_AUDIO


class TokenChunk(msgspec.Struct, frozen=True, gc=False):
    """One streamed piece of a generation: NEW ids only (a delta). The last chunk, and only it, carries
    ``finish_reason``; its ``token_ids`` may be empty. Stop ids are never included."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None


class BackendCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    sampling: frozenset[str]  # names from OPTIONAL_SAMPLING_FIELDS the backend honours
    max_model_len: int
    max_concurrency: int | None = None  # None = no fixed cap (continuous batching)
    deterministic_seed: bool = False  # same request + same seed → same ids
    devices: frozenset[str] = frozenset({"cpu"})
    # Rows of the model's embedding; when given, BackendBase.validate rejects out-of-range prompt/allowed ids.
    vocab_size: int | None = None


class BackendHealth(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["starting", "ready", "degraded", "stopped"]
    running: int = 0
    waiting: int = 0
    detail: str | None = None


class BackendConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Runtime-independent backend settings; backend-specific ones go in ``options`` (validated by the
    backend's own ``Options`` Struct)."""

    model_dir: str  # local Hugging Face-layout LLM folder; never a hub id
    max_model_len: Annotated[int, Meta(ge=16)] = 32768  # --max_length
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # --torch_dtype
    device: str = "auto"  # --llm_device
    seed: int | None = 0
    max_batch_size: Annotated[int, Meta(ge=1)] = 8  # --llm_batch_size
    gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.6
    attn_implementation: str | None = None  # --llm_attn_implementation
    # Threads the runtime may use for its CPU work; None: the backend's own default. A backend option of its own
    # (e.g. num_threads) wins over this.
    cpu_threads: Annotated[int, Meta(ge=1)] | None = None
    options: dict[str, Any] = {}  # --backend_option key=value


# --- engine side ----------------------------------------------------------------------------------------------


class SamplingOverrides(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Sampling values a client asked for; ``None`` means "the engine's default"."""

    temperature: FiniteNonNeg | None = None
    top_k: Annotated[int, Meta(ge=0, le=10_000)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    seed: int | None = None


class ReferenceAudio(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded voice reference, still encoded (any format PyAV decodes)."""

    data: bytes
    text: str | None = None  # transcript of the reference, if known
    latent: bytes | None = None  # engine-specific side file (MegaTTS3 ``.npy`` latent)


class VoicePrompt(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine derived from a reference (e.g. Spark's global/semantic token ids). JSON-serialisable so
    the voice store can cache it next to the role's audio; ``fingerprint`` ties it to the codec weights."""

    engine: str
    fingerprint: str
    data: dict[str, Any]


class SynthesisRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    text: str
    voice: str | None = None  # a built-in voice of the engine (Spark female/male, Orpheus tara, ...)
    prompt: VoicePrompt | None = None  # a cloned voice (role or ad-hoc reference)
    pitch: Level | None = None
    speed: Level | None = None
    sampling: SamplingOverrides = SamplingOverrides()
    length_threshold: Annotated[int, Meta(ge=1, le=100_000)] = 50
    window_size: Annotated[int, Meta(ge=1, le=100_000)] = 50
    stream: bool = False  # a hint: streaming callers want the first audio early
    options: dict[str, Any] = {}  # engine-specific request options


class AudioChunk(msgspec.Struct, frozen=True, gc=False):
    """Mono float32 PCM in [-1, 1] at the engine's ``info.sample_rate``."""

    samples: np.ndarray


class VoiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Literal["builtin", "role"]
    language: str | None = None
    description: str | None = None


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # model family: "spark", "orpheus", "mega"
    sample_rate: int
    builtin_voices: tuple[VoiceInfo, ...] = ()
    default_voice: str | None = None
    supports_cloning: bool = False
    requires_latent: bool = False  # cloning needs a latent file beside the audio (MegaTTS3)
    controls: frozenset[str] = frozenset()  # request controls honoured: {"pitch", "speed"}
    languages: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # inline tags passed through the text (Orpheus emotions)
    reference_min_seconds: float = 0.5
    reference_max_seconds: float = 30.0


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    device: str = "auto"  # tokenizer (audio encoder) device
    detokenizer_device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    seed: int | None = 0
    batch_size: Annotated[int, Meta(ge=1)] = 8  # dynamic batch size of codec work
    wait_timeout: Annotated[float, Meta(ge=0.0)] = 0.01  # dynamic batch gather time (s)
    state_dir: str | None = None  # where an engine may persist small state (e.g. pinned voices)
    cpu_threads: Annotated[int, Meta(ge=1)] | None = None  # intra-op threads of codec work on the CPU (None: torch's)
    options: dict[str, Any] = {}  # engine-specific (validated by the engine's ``Options`` Struct)
