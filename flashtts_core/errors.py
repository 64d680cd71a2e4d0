"""The one error hierarchy of FlashTTS.

Everything raised on purpose derives from :class:`FlashTTSError`. Each class knows the HTTP status and the
OpenAI error ``type`` it maps to; the server renders them in one place (``flashtts_core.server.errors``) as
``{"error": {"message", "type", "param", "code"}}``. Messages say what is wrong *and* what to do.
"""

from __future__ import annotations

__all__ = (
    "AudioDecodeError",
    "AuthenticationError",
    "BackendNotReadyError",
    "CheckpointError",
    "ConflictError",
    "FlashTTSError",
    "GenerationError",
    "InvalidRequestError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PluginError",
    "PromptTooLongError",
    "RequestTimeoutError",
    "UnsupportedFeatureError",
    "UnsupportedSamplingError",
    "VoiceNotFoundError",
)


class FlashTTSError(Exception):
    """Base of every deliberate FlashTTS error."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, object]:
        """The OpenAI error envelope for this error."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# --- client mistakes (4xx) -----------------------------------------------------------------------------------


class InvalidRequestError(FlashTTSError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedSamplingError(InvalidRequestError):
    """A sampling parameter the selected backend does not honour was given a non-default value."""

    default_code = "unsupported_sampling_parameter"


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the requested tokens) does not fit the model context."""

    default_code = "context_length_exceeded"


class AudioDecodeError(InvalidRequestError):
    """Reference audio that is empty, undecodable, too long or too short."""

    default_code = "invalid_audio"


class UnsupportedFeatureError(InvalidRequestError):
    """The loaded engine cannot do what was asked (e.g. cloning with Orpheus)."""

    default_code = "unsupported_feature"


class AuthenticationError(FlashTTSError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(FlashTTSError):
    status_code = 404
    error_type = "not_found_error"


class VoiceNotFoundError(NotFoundError):
    default_code = "voice_not_found"


class ConflictError(FlashTTSError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLargeError(FlashTTSError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


# --- server side ---------------------------------------------------------------------------------------------


class OverloadedError(FlashTTSError):
    """Admission queue full; the client should retry after ``retry_after`` seconds (503)."""

    status_code = 503
    error_type = "server_overloaded"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class BackendNotReadyError(FlashTTSError):
    """The backend or engine is used before ``startup()`` finished (503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "not_ready"


class RequestTimeoutError(FlashTTSError):
    status_code = 504
    error_type = "server_error"
    default_code = "timeout"


class GenerationError(FlashTTSError):
    """The model produced no usable audio (e.g. no semantic tokens) even after a retry (500)."""

    status_code = 500
    error_type = "server_error"
    default_code = "generation_failed"


# --- start-up problems (never rendered as HTTP; the CLI prints them) ----------------------------------------


class PluginError(FlashTTSError):
    """A backend/engine plugin cannot be found, loaded or used."""


class CheckpointError(FlashTTSError):
    """A model directory does not match the layout/keys/shapes the engine expects."""
