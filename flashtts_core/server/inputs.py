"""Request inputs shared by the routes: text limits, sampling fields, reference audio (file, URL or base64).

Everything here turns wire values into the service's types (:class:`SynthesisRequest`, :class:`ReferenceAudio`)
and raises the 4xx errors that name the offending field, before any model work starts.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import anyio

from flashtts_core.config import ServerSettings
from flashtts_core.errors import AudioDecodeError, InvalidRequestError, PayloadTooLargeError
from flashtts_core.plugins.types import Level, ReferenceAudio, SamplingOverrides
from flashtts_core.server.context import new_request_id
from flashtts_core.server.fetch import fetch_url, looks_like_url

__all__ = (
    "check_reference_text",
    "check_text",
    "level_from_float",
    "load_reference",
    "load_reference_string",
    "new_request_id",
    "sampling_overrides",
)

logger = logging.getLogger(__name__)


def check_text(text: str, settings: ServerSettings, *, param: str) -> str:
    """The text to synthesise, or a 400: empty/whitespace-only or longer than ``--max_text_chars``."""
    if not text or not text.strip():
        raise InvalidRequestError(f"'{param}' is empty; send the text to synthesise", param=param, code="empty_text")
    if len(text) > settings.max_text_chars:
        raise InvalidRequestError(
            f"'{param}' has {len(text)} characters; the limit is {settings.max_text_chars}. "
            "Split the text into several requests.",
            param=param,
            code="text_too_long",
        )
    return text


def check_reference_text(text: str | None, settings: ServerSettings, *, param: str = "reference_text") -> None:
    """A reference transcript may be absent, but not longer than ``--max_text_chars``."""
    if text is not None and len(text) > settings.max_text_chars:
        raise InvalidRequestError(
            f"'{param}' has {len(text)} characters; the limit is {settings.max_text_chars} "
            "(it is the transcript of a reference recording of a few seconds)",
            param=param,
            code="text_too_long",
        )


def sampling_overrides(data: Any) -> SamplingOverrides:
    """The sampling fields a client set (``None`` = engine default) from any request Struct."""
    return SamplingOverrides(
        temperature=data.temperature,
        top_k=data.top_k,
        top_p=data.top_p,
        repetition_penalty=data.repetition_penalty,
        max_tokens=data.max_tokens,
        seed=data.seed,
    )


def level_from_float(value: float) -> Level:
    """Map OpenAI's continuous 0.25-4.0 ``speed`` (or ``pitch``) onto the five levels, as the original did:
    ≤0.5 very_low, <1 low, <2 moderate (so the default 1.0 changes nothing), <3 high, else very_high."""
    x = min(max(value, 0.25), 4.0)
    if x <= 0.5:
        return "very_low"
    if x < 1.0:
        return "low"
    if x < 2.0:
        return "moderate"
    if x < 3.0:
        return "high"
    return "very_high"


async def load_reference_string(value: str, settings: ServerSettings, *, param: str) -> bytes:
    """Reference audio given as text: an http(s) URL (downloaded under the SSRF rules) or base64."""
    value = value.strip()
    if looks_like_url(value):
        return await fetch_url(
            value,
            max_bytes=settings.max_upload_bytes,
            timeout_s=settings.url_timeout,
            allow_private=settings.allow_private_urls,
            param=param,
        )
    from flashtts_core.audio.decode import decode_base64

    decode = partial(decode_base64, value, max_bytes=settings.max_upload_bytes, param=param)
    if len(value) > 1_000_000:
        return await anyio.to_thread.run_sync(decode)
    return decode()


async def load_reference(
    *,
    text_value: str | None,
    file_value: bytes | None,
    reference_text: str | None,
    latent: bytes | None,
    settings: ServerSettings,
    text_param: str,
    file_param: str,
    requires_latent: bool = False,
) -> ReferenceAudio:
    """Exactly one of a text reference (URL/base64) and an uploaded file, plus transcript and latent."""
    if text_value is not None and file_value is not None:
        raise InvalidRequestError(
            f"send either '{file_param}' (a file) or '{text_param}' (a URL or base64), not both", param=file_param
        )
    if text_value is None and file_value is None:
        raise InvalidRequestError(
            f"reference audio is missing: upload '{file_param}' or send '{text_param}' as a URL or base64",
            param=text_param,
        )
    if requires_latent and latent is None:
        raise InvalidRequestError(
            "this engine needs the reference's latent file: upload 'latent_file' (.npy) with the audio",
            param="latent_file",
        )
    if file_value is not None:
        if not file_value:
            raise AudioDecodeError(f"'{file_param}' is empty; upload a recording", param=file_param)
        if len(file_value) > settings.max_upload_bytes:
            raise PayloadTooLargeError(
                f"'{file_param}' is larger than the limit of {settings.max_upload_bytes / 1_000_000:.1f} MB",
                param=file_param,
            )
        data = file_value
    else:
        assert text_value is not None
        data = await load_reference_string(text_value, settings, param=text_param)
    text = reference_text.strip() if reference_text else None
    return ReferenceAudio(data=data, text=text or None, latent=latent)
