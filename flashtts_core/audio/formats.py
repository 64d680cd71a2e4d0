"""The audio response formats FlashTTS can produce, and what each one means on the wire.

This module is import-cheap (no PyAV): the server uses it to validate ``response_format`` and to pick the
``Content-Type`` before any audio exists, and the CLI uses :func:`format_from_extension` to choose a format from
an output path.

The set of formats is OpenAI's (``mp3``, ``opus``, ``aac``, ``flac``, ``wav``, ``pcm``). Containers:

* ``opus`` is Opus in **Ogg** (RFC 7845), so its type is ``audio/ogg; codecs=opus`` (``audio/opus`` is the RTP
  payload type of RFC 7587, not a file type, although the original FlashTTS sent it).
* ``aac`` is raw **ADTS** frames (``audio/aac``), which stream; AAC in MP4 would need a seekable output.
* ``pcm`` is headerless 16-bit signed little-endian mono. ``audio/L16`` (RFC 2586) is big-endian, so it would
  be wrong here; :func:`mime_type` adds ``rate``/``channels`` parameters to ``audio/pcm`` instead.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, get_args

import msgspec

from ..errors import InvalidRequestError

__all__ = (
    "FORMATS",
    "OPENAI_PCM_SAMPLE_RATE",
    "RESPONSE_FORMATS",
    "AudioFormat",
    "ResponseFormat",
    "format_from_extension",
    "get_format",
    "mime_type",
)

logger = logging.getLogger(__name__)

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = get_args(ResponseFormat)

# OpenAI documents ``pcm`` as "raw samples in 24kHz (16-bit signed, low-endian), without the header".
OPENAI_PCM_SAMPLE_RATE = 24_000

# MPEG-1/2/2.5 Layer III sampling rates (libmp3lame accepts exactly these).
_MP3_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)
# The sampling-frequency-index table of ISO 14496-3 (what an ADTS header can signal).
_AAC_RATES = (7_350, 8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 64_000, 88_200, 96_000)
# libopus runs internally at these rates only.
_OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)


class AudioFormat(msgspec.Struct, frozen=True, kw_only=True):
    """One response format: how it is muxed, encoded, labelled and named."""

    name: ResponseFormat
    container: str
    """FFmpeg/PyAV muxer name (``wav`` and ``s16le`` are written by FlashTTS itself, without PyAV)."""
    codec: str
    """FFmpeg/PyAV encoder name."""
    sample_format: str
    """PyAV sample format the encoder is fed with (mono, so packed and planar are the same bytes)."""
    mime: str
    """``Content-Type`` without parameters."""
    extension: str
    """File extension without the dot."""
    sample_rates: tuple[int, ...] | None = None
    """Rates the codec accepts, ascending; ``None`` means any rate up to :attr:`max_sample_rate`."""
    max_sample_rate: int = 384_000
    lossless: bool = False
    default_bitrate: int | None = None
    """Bits per second used when the caller gives none (lossy formats only)."""

    def supported_rate(self, rate: int) -> int:
        """The rate this format will actually use for a requested ``rate``.

        The smallest supported rate that is not below ``rate`` (so no bandwidth is lost), else the highest
        supported one. Formats without a rate list take ``rate`` as is, capped at :attr:`max_sample_rate`.
        """
        if rate <= 0:
            raise InvalidRequestError(f"Sample rate must be a positive integer, got {rate}.", param="sample_rate")
        if self.sample_rates is None:
            return min(rate, self.max_sample_rate)
        for candidate in self.sample_rates:
            if candidate >= rate:
                return candidate
        return self.sample_rates[-1]


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat(
        name="mp3",
        container="mp3",
        codec="libmp3lame",
        sample_format="fltp",
        mime="audio/mpeg",
        extension="mp3",
        sample_rates=_MP3_RATES,
        default_bitrate=128_000,
    ),
    "opus": AudioFormat(
        name="opus",
        container="ogg",
        codec="libopus",
        sample_format="flt",
        mime="audio/ogg; codecs=opus",
        extension="opus",
        sample_rates=_OPUS_RATES,
        default_bitrate=64_000,
    ),
    "aac": AudioFormat(
        name="aac",
        container="adts",
        codec="aac",
        sample_format="fltp",
        mime="audio/aac",
        extension="aac",
        sample_rates=_AAC_RATES,
        default_bitrate=128_000,
    ),
    "flac": AudioFormat(
        name="flac",
        container="flac",
        codec="flac",
        sample_format="s16",
        mime="audio/flac",
        extension="flac",
        max_sample_rate=655_350,  # the largest rate a FLAC STREAMINFO block can hold (20 bits, 10 Hz units)
        lossless=True,
    ),
    "wav": AudioFormat(
        name="wav",
        container="wav",
        codec="pcm_s16le",
        sample_format="s16",
        mime="audio/wav",
        extension="wav",
        lossless=True,
    ),
    "pcm": AudioFormat(
        name="pcm",
        container="s16le",
        codec="pcm_s16le",
        sample_format="s16",
        mime="audio/pcm",
        extension="pcm",
        lossless=True,
    ),
}

# Extensions the CLI understands beyond each format's own one.
_EXTENSION_ALIASES: dict[str, ResponseFormat] = {
    "ogg": "opus",
    "oga": "opus",
    "adts": "aac",
    "wave": "wav",
    "raw": "pcm",
    "s16le": "pcm",
}


def get_format(name: str) -> AudioFormat:
    """The :class:`AudioFormat` called ``name``; :class:`InvalidRequestError` (``param="response_format"``) if none."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidRequestError(
            f"Unsupported response_format {name!r}; use one of {', '.join(RESPONSE_FORMATS)}.",
            param="response_format",
        ) from None


def mime_type(fmt: str, sample_rate: int | None = None) -> str:
    """The ``Content-Type`` for ``fmt``.

    For ``pcm`` with a known ``sample_rate`` the rate and channel count are added as parameters
    (``audio/pcm; rate=24000; channels=1``), since the bytes alone do not say them. Other formats carry the
    rate in their header and get the bare type.
    """
    spec = get_format(fmt)
    if spec.name == "pcm" and sample_rate is not None:
        return f"{spec.mime}; rate={sample_rate}; channels=1"
    return spec.mime


def format_from_extension(path: str | os.PathLike[str], *, default: ResponseFormat | None = None) -> ResponseFormat:
    """The response format implied by ``path``'s extension (case-insensitive), e.g. ``out.ogg`` → ``opus``.

    Without a known extension, ``default`` is returned, or :class:`InvalidRequestError` raised if it is ``None``.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext in FORMATS:
        return FORMATS[ext].name
    if ext in _EXTENSION_ALIASES:
        return _EXTENSION_ALIASES[ext]
    if default is not None:
        return default
    known = sorted({*FORMATS, *_EXTENSION_ALIASES})
    raise InvalidRequestError(
        f"Cannot tell the audio format of {os.fspath(path)!r} from its extension; "
        f"use one of .{', .'.join(known)} or name the format explicitly.",
        param="output",
    )
