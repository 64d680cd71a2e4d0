"""Reference-audio decoding: any audio PyAV can read → mono float32 at the rate a model wants.

Imports PyAV at module level; import this module only where audio is decoded.

Accepted input is whatever FFmpeg demuxes and decodes (WAV in any PCM/float depth, MP3, FLAC, Ogg Opus/Vorbis,
M4A/AAC, WebM/Opus from a browser's ``MediaRecorder``, …), at any rate and channel count. Channels are
**averaged** to mono (the original FlashTTS kept channel 0; the mean keeps speech that was recorded on one
side only and is the same for the usual identical-channel "stereo" recordings). The result is resampled to
``target_rate`` with soxr at ``VHQ``.

Every problem with the input is an :class:`~flashtts_core.errors.AudioDecodeError` (HTTP 400) whose message
says what to send instead; oversize input is a :class:`~flashtts_core.errors.PayloadTooLargeError` (413).
Length limits are checked while decoding, so a one-hour upload stops being decoded just past ``max_seconds``.
Container metadata (durations in headers) is not trusted: streamed WAVs and MediaRecorder WebMs lie or omit it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re

import av
import numpy as np

from ..errors import AudioDecodeError, PayloadTooLargeError
from .resample import resample

__all__ = ("decode_audio", "decode_base64", "decode_base64_audio")

logger = logging.getLogger(__name__)

# Scale factors that map each integer sample format onto [-1, 1).
_INT_SCALE = {"s16": 1.0 / 32768.0, "s32": 1.0 / 2147483648.0, "s64": 1.0 / 9223372036854775808.0}
_DATA_URL = re.compile(r"^data:([^,]*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _what(param: str | None) -> str:
    return f"'{param}'" if param else "the audio"


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as mono float32 (channel mean)."""
    fmt = frame.format
    channels = frame.layout.nb_channels or 1
    data = frame.to_ndarray()
    if not fmt.is_planar:
        # Packed formats come back as (1, samples * channels), interleaved.
        data = data.reshape(-1, channels).T
    base = fmt.name.rstrip("p")
    if base in ("flt", "dbl"):
        x = data.astype(np.float32, copy=False)
    elif base == "u8":
        x = (data.astype(np.float32) - 128.0) * (1.0 / 128.0)
    else:
        x = data.astype(np.float32) * np.float32(_INT_SCALE[base])
    if x.shape[0] == 1:
        return x[0]
    return x.mean(axis=0, dtype=np.float32)


def decode_audio(
    data: bytes | bytearray | memoryview,
    *,
    target_rate: int,
    max_seconds: float | None = None,
    min_seconds: float | None = None,
    max_bytes: int | None = None,
    param: str | None = None,
) -> np.ndarray:
    """Decode an audio file's bytes into mono float32 samples at ``target_rate`` Hz.

    Raises :class:`PayloadTooLargeError` when ``len(data) > max_bytes`` and :class:`AudioDecodeError` when the
    input is empty, not audio, has no samples, or lasts more than ``max_seconds`` / less than ``min_seconds``
    (durations of the input as recorded, before resampling). ``param`` names the request field on the errors.
    """
    what = _what(param)
    size = len(data)
    if size == 0:
        raise AudioDecodeError(f"{what} is empty; send a WAV, MP3, FLAC, Ogg or M4A recording.", param=param)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLargeError(
            f"{what} is {_mb(size)}; the limit is {_mb(max_bytes)}. Send a shorter or compressed recording.",
            param=param,
        )
    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise AudioDecodeError(
            f"{what} could not be read as audio ({exc.__class__.__name__}: {exc}); "
            "send a WAV, MP3, FLAC, Ogg or M4A file.",
            param=param,
        ) from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(
                f"{what} contains no audio stream (detected format: {container.format.name}); send an audio file.",
                param=param,
            )
        stream = container.streams.audio[0]
        # (rate, chunks) runs; a new run starts if the rate changes mid-file (e.g. chained Ogg streams).
        runs: list[tuple[int, list[np.ndarray]]] = []
        seconds = 0.0
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                rate = frame.sample_rate
                if not runs or runs[-1][0] != rate:
                    runs.append((rate, []))
                runs[-1][1].append(_frame_to_mono(frame))
                seconds += frame.samples / rate
                if max_seconds is not None and seconds > max_seconds:
                    raise AudioDecodeError(
                        f"{what} is longer than the limit of {max_seconds:g} s; trim it to a few seconds of speech.",
                        param=param,
                        code="audio_too_long",
                    )
        except av.FFmpegError as exc:
            if not runs:
                raise AudioDecodeError(
                    f"{what} could not be decoded ({exc.__class__.__name__}: {exc}); "
                    "send a WAV, MP3, FLAC, Ogg or M4A file.",
                    param=param,
                ) from exc
            # A damaged tail (e.g. a truncated upload): keep what decoded cleanly.
            logger.warning("reference audio damaged after %.2f s; using the decoded part (%s)", seconds, exc)
    if seconds == 0.0:
        raise AudioDecodeError(f"{what} contains no audio samples; send a recording with speech.", param=param)
    if min_seconds is not None and seconds < min_seconds:
        raise AudioDecodeError(
            f"{what} is {seconds:.2f} s long; at least {min_seconds:g} s of speech is needed.",
            param=param,
            code="audio_too_short",
        )
    pieces = [resample(np.concatenate(chunks), rate, target_rate) for rate, chunks in runs]
    out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return np.ascontiguousarray(out, dtype=np.float32)


def decode_base64(text: str | bytes, *, max_bytes: int | None = None, param: str | None = None) -> bytes:
    """The bytes of a base64 string, tolerant of what clients send.

    Accepts a ``data:<type>;base64,`` URL prefix, whitespace and line breaks, missing ``=`` padding and the
    URL-safe alphabet (``-``/``_``). Anything else outside the alphabet is an :class:`AudioDecodeError` (code
    ``invalid_base64``), not silently skipped. Raises :class:`PayloadTooLargeError` if the decoded size would
    exceed ``max_bytes`` (checked before decoding).
    """
    what = _what(param)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError as exc:
            raise AudioDecodeError(
                f"{what} is not valid base64 (non-ASCII bytes).", param=param, code="invalid_base64"
            ) from exc
    # Cheap bound before touching a huge string: base64 is 4/3 of the payload, plus line breaks.
    if max_bytes is not None and len(text) > 2 * max_bytes + 4096:
        raise PayloadTooLargeError(f"{what} is larger than the limit of {_mb(max_bytes)}.", param=param)
    text = text.strip()
    match = _DATA_URL.match(text)
    if match:
        if not match.group(1).lower().endswith(";base64"):
            raise AudioDecodeError(
                f"{what} is a data URL without ';base64'; encode the audio as base64.",
                param=param,
                code="invalid_base64",
            )
        text = text[match.end() :]
    text = _WHITESPACE.sub("", text).rstrip("=")
    if not text:
        raise AudioDecodeError(f"{what} is empty; send base64-encoded audio.", param=param)
    if len(text) % 4 == 1:
        raise AudioDecodeError(
            f"{what} is not valid base64 (truncated: {len(text)} characters).", param=param, code="invalid_base64"
        )
    decoded_size = len(text) * 3 // 4
    if max_bytes is not None and decoded_size > max_bytes:
        raise PayloadTooLargeError(
            f"{what} is {_mb(decoded_size)}; the limit is {_mb(max_bytes)}. Send a shorter or compressed recording.",
            param=param,
        )
    try:
        raw = text.encode("ascii").translate(_URLSAFE) + b"=" * (-len(text) % 4)
        return base64.b64decode(raw, validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise AudioDecodeError(
            f"{what} is not valid base64 ({exc}); send the file's bytes base64-encoded.",
            param=param,
            code="invalid_base64",
        ) from exc


def decode_base64_audio(
    text: str | bytes,
    *,
    target_rate: int,
    max_seconds: float | None = None,
    min_seconds: float | None = None,
    max_bytes: int | None = None,
    param: str | None = None,
) -> np.ndarray:
    """:func:`decode_base64` then :func:`decode_audio` (see both for the errors)."""
    data = decode_base64(text, max_bytes=max_bytes, param=param)
    return decode_audio(
        data,
        target_rate=target_rate,
        max_seconds=max_seconds,
        min_seconds=min_seconds,
        max_bytes=max_bytes,
        param=param,
    )
