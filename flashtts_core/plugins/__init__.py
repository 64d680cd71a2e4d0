"""The plugin contract: what backends and engines implement, and how they are found.

Third-party plugins import only from here (never from ``flashtts_core.server`` or private modules).
"""

from flashtts_core.plugins.base import BACKEND_API_VERSION, ENGINE_API_VERSION, BackendBase, EngineBase, NoOptions
from flashtts_core.plugins.registry import BACKEND_GROUP, ENGINE_GROUP, PluginInfo, Registry, get_registry
from flashtts_core.plugins.streams import AdmissionQueue, QueueItem, first_audio_reserve, token_stream
from flashtts_core.plugins.types import (
    FIRST_AUDIO,
    LATER_AUDIO,
    AudioChunk,
    BackendCapabilities,
    BackendConfig,
    BackendHealth,
    EngineConfig,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    ReferenceAudio,
    SamplingOverrides,
    SamplingParams,
    SynthesisRequest,
    TokenChunk,
    VoiceInfo,
    VoicePrompt,
)

__all__ = (
    "BACKEND_API_VERSION",
    "BACKEND_GROUP",
    "ENGINE_API_VERSION",
    "ENGINE_GROUP",
    "FIRST_AUDIO",
    "LATER_AUDIO",
    "AdmissionQueue",
    "AudioChunk",
    "BackendBase",
    "BackendCapabilities",
    "BackendConfig",
    "BackendHealth",
    "EngineBase",
    "EngineConfig",
    "EngineInfo",
    "FinishReason",
    "GenerationRequest",
    "NoOptions",
    "PluginInfo",
    "QueueItem",
    "ReferenceAudio",
    "Registry",
    "SamplingOverrides",
    "SamplingParams",
    "SynthesisRequest",
    "TokenChunk",
    "VoiceInfo",
    "VoicePrompt",
    "first_audio_reserve",
    "get_registry",
    "token_stream",
)
