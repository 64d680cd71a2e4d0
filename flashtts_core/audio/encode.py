"""Incremental audio encoding: one :class:`AudioEncoder` per response, fed chunk by chunk.

Imports PyAV at module level; import this module only where audio is encoded.

How each format is produced:

* ``pcm``: float → int16 with numpy (clip to [-1, 1], scale by 32767, round), written as raw s16le bytes.
* ``wav``: the same samples behind a 44-byte RIFF header written here (no PyAV): streamed responses use
  the open-ended convention (RIFF and ``data`` sizes ``0xFFFFFFFF``); non-streamed ones carry exact sizes.
  FFmpeg's WAV muxer would add a ``LIST/INFO`` chunk (78-byte header), which breaks clients that skip 44 bytes.
* ``mp3``/``opus``/``aac``/``flac``: a PyAV container on an in-memory sink.

  - Non-streamed, the sink is a seekable ``BytesIO`` and everything is returned by :meth:`AudioEncoder.finish`,
    after the muxer trailer has patched the header: MP3 gets a Xing/LAME frame with the real frame count and
    gapless delay/padding, FLAC a STREAMINFO with the total sample count and MD5.
  - Streamed, the sink is write-only (FFmpeg then skips the Xing frame and leaves FLAC's totals at 0, "unknown",
    as the FLAC format allows), ``flush_packets`` hands each muxed packet over at once, and Ogg pages are cut
    every 100 ms instead of every second, so bytes leave after each :meth:`~AudioEncoder.encode` call that
    completes a codec frame.
  - ``fflags=+bitexact`` (and the codec flag of the same name) keeps FFmpeg version strings out of the
    output; MP3 gets no ID3v2 tag.

Rates: the encoder runs at ``output_rate`` (default: ``input_rate``) if the codec supports it, else at the
rate :meth:`AudioFormat.supported_rate` picks (e.g. Opus at 22.05 kHz → 24 kHz); :attr:`AudioEncoder.sample_rate`
says which. Rate conversion is done here with soxr (streamed, ``HQ``), never by FFmpeg.
"""

from __future__ import annotations

import io
import logging
import struct
from fractions import Fraction
from typing import Protocol

import av
import numpy as np

from ..errors import InvalidRequestError
from .formats import AudioFormat, get_format, mime_type
from .resample import StreamResampler

__all__ = ("AudioEncoder", "encode_all")

logger = logging.getLogger(__name__)

# Ogg page length for streamed Opus, in microseconds. FFmpeg's default (1 s) would hold back a whole second of
# audio; 100 ms keeps latency low for ~3 % container overhead (a 27-byte page header per 5 Opus packets).
_STREAM_OGG_PAGE_DURATION_US = 100_000
# The RIFF/data size placeholder of open-ended (streamed) WAV.
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")  # RIFF header + 16-byte PCM fmt chunk + data chunk header


def _to_s16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → little-endian int16 (clipped, rounded to nearest)."""
    y = np.multiply(x, 32767.0, dtype=np.float32)
    np.clip(y, -32767.0, 32767.0, out=y)
    np.rint(y, out=y)
    return y.astype("<i2")


def _wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte mono s16le WAV header; ``data_bytes=None`` writes the open-ended 0xFFFFFFFF sizes."""
    if data_bytes is None:
        riff_size = data_size = _WAV_UNKNOWN_SIZE
    else:
        if data_bytes > _WAV_UNKNOWN_SIZE - 36:
            logger.warning("WAV data of %d bytes exceeds the 4 GiB RIFF limit; sizes are clamped", data_bytes)
        data_size = min(data_bytes, _WAV_UNKNOWN_SIZE - 36)
        riff_size = data_size + 36
    return _WAV_HEADER.pack(
        b"RIFF", riff_size, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16, b"data", data_size
    )


def _as_mono_float32(samples: np.ndarray) -> np.ndarray:
    """Validate and convert encoder input to a contiguous 1-D float32 array."""
    x = np.asarray(samples)
    if x.ndim != 1:
        if x.ndim == 2 and 1 in x.shape:
            x = x.reshape(-1)
        else:
            raise ValueError(f"AudioEncoder takes mono audio (1-D samples), got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / np.float32(32768.0)
    if x.dtype.kind != "f":
        raise ValueError(f"AudioEncoder takes float samples in [-1, 1] (or int16), got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


class _Writer(Protocol):
    def write(self, x: np.ndarray) -> bytes: ...

    def finish(self) -> bytes: ...

    def close(self) -> None: ...


class _PcmWriter:
    """Headerless s16le."""

    def write(self, x: np.ndarray) -> bytes:
        return _to_s16(x).tobytes()

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _WavWriter:
    """s16le behind a 44-byte header: open-ended when streamed, exact sizes when not."""

    def __init__(self, sample_rate: int, streaming: bool) -> None:
        self._rate = sample_rate
        self._streaming = streaming
        self._header_sent = False
        self._parts: list[bytes] = []
        self._data_bytes = 0

    def write(self, x: np.ndarray) -> bytes:
        data = _to_s16(x).tobytes()
        if not self._streaming:
            self._parts.append(data)
            self._data_bytes += len(data)
            return b""
        if self._header_sent:
            return data
        self._header_sent = True
        return _wav_header(self._rate, None) + data

    def finish(self) -> bytes:
        if self._streaming:
            if self._header_sent:
                return b""
            self._header_sent = True
            return _wav_header(self._rate, None)
        out = b"".join([_wav_header(self._rate, self._data_bytes), *self._parts])
        self._parts.clear()
        return out

    def close(self) -> None:
        self._parts.clear()


class _ChunkSink:
    """A write-only file for PyAV: no ``seek``/``tell``, so FFmpeg treats the output as a non-seekable stream."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        if not self._parts:
            return b""
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _effective_bitrate(spec: AudioFormat, sample_rate: int, bitrate: int | None) -> int | None:
    """The bitrate to ask the codec for, capped where the codec would otherwise refuse or warn."""
    if spec.lossless:
        return None
    if bitrate is None:
        bitrate = spec.default_bitrate
    elif bitrate <= 0:
        raise InvalidRequestError(
            f"bitrate must be a positive number of bits per second, got {bitrate}.", param="bitrate"
        )
    if bitrate is None:
        return None
    if spec.name == "mp3":
        # MPEG-2.5 (≤ 12 kHz) tops out at 64 kb/s, MPEG-2 (≤ 24 kHz) at 160 kb/s, MPEG-1 at 320 kb/s.
        cap = 64_000 if sample_rate <= 12_000 else 160_000 if sample_rate <= 24_000 else 320_000
        return min(bitrate, cap)
    if spec.name == "aac":
        # An AAC frame carries at most 6144 bits per channel per 1024 samples.
        return min(bitrate, 6 * sample_rate)
    if spec.name == "opus":
        return min(max(bitrate, 6_000), 256_000)  # libopus's useful range for one channel
    return bitrate


class _PyAVWriter:
    """An FFmpeg muxer + encoder on an in-memory sink (see the module docstring for the two modes)."""

    def __init__(self, spec: AudioFormat, sample_rate: int, streaming: bool, bitrate: int | None) -> None:
        self._streaming = streaming
        self._sink: _ChunkSink | io.BytesIO = _ChunkSink() if streaming else io.BytesIO()
        container_options = {"fflags": "+bitexact"}
        if spec.container == "mp3":
            container_options["id3v2_version"] = "0"
        if streaming:
            container_options["flush_packets"] = "1"
            if spec.container == "ogg":
                container_options["page_duration"] = str(_STREAM_OGG_PAGE_DURATION_US)
        self._container = av.open(self._sink, mode="w", format=spec.container, container_options=container_options)
        try:
            stream = self._container.add_stream(spec.codec, rate=sample_rate, options={"flags": "+bitexact"})
            stream.layout = "mono"
            stream.format = spec.sample_format
            if bitrate is not None:
                stream.bit_rate = bitrate
        except BaseException:
            self._container.close()
            raise
        self._stream = stream
        self._rate = sample_rate
        self._time_base = Fraction(1, sample_rate)
        self._format = spec.sample_format
        self._pts = 0

    def _take(self) -> bytes:
        return self._sink.take() if isinstance(self._sink, _ChunkSink) else b""

    def write(self, x: np.ndarray) -> bytes:
        n = x.shape[0]
        if n == 0:
            return self._take()
        arr = _to_s16(x) if self._format == "s16" else x
        frame = av.AudioFrame.from_ndarray(arr.reshape(1, n), format=self._format, layout="mono")
        frame.sample_rate = self._rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += n
        packets = self._stream.encode(frame)
        if packets:
            self._container.mux(packets)
        return self._take()

    def finish(self) -> bytes:
        packets = self._stream.encode(None)
        if packets:
            self._container.mux(packets)
        self._container.start_encoding()  # writes the header even if no packet ever came (empty input)
        self._container.close()  # trailer: patches sizes when seekable, ends the Ogg stream
        if isinstance(self._sink, io.BytesIO):
            return self._sink.getvalue()
        return self._sink.take()

    def close(self) -> None:
        self._container.close()


class AudioEncoder:
    """Encode one response's mono audio, chunk by chunk, into ``fmt``.

    ``encode`` returns the bytes that are ready (``b""`` while a codec or a non-streamed container buffers);
    ``finish`` flushes and returns the rest. The concatenation of all returned bytes is the response body:

    * ``streaming=False``: a complete, seekable-quality file (exact WAV sizes, MP3 Xing/LAME frame count, FLAC
      STREAMINFO totals). All bytes come from ``finish``, except for ``pcm``, which has no header.
    * ``streaming=True``: bytes leave progressively, with open-ended headers where a format has sizes.

    Input: 1-D float samples in [-1, 1] (int16 is accepted and scaled by 1/32768) at ``input_rate``; any
    length, including 0. Output rate: :attr:`sample_rate` (``output_rate`` or ``input_rate``, moved to the
    nearest rate the codec supports). Not thread-safe; use one encoder from one thread at a time.
    """

    def __init__(
        self,
        fmt: str,
        *,
        input_rate: int,
        output_rate: int | None = None,
        streaming: bool,
        bitrate: int | None = None,
    ) -> None:
        self.spec: AudioFormat = get_format(fmt)
        if int(input_rate) != input_rate or input_rate <= 0:
            raise InvalidRequestError(f"input_rate must be a positive integer, got {input_rate!r}.")
        if output_rate is not None and (int(output_rate) != output_rate or output_rate <= 0):
            raise InvalidRequestError(
                f"Sample rate must be a positive integer, got {output_rate!r}.", param="sample_rate"
            )
        self.format: str = self.spec.name
        self.input_rate: int = int(input_rate)
        self.streaming: bool = streaming
        requested = self.input_rate if output_rate is None else int(output_rate)
        self.sample_rate: int = self.spec.supported_rate(requested)
        if self.sample_rate != requested:
            logger.debug("%s cannot run at %d Hz; encoding at %d Hz", self.format, requested, self.sample_rate)
        self.bitrate: int | None = _effective_bitrate(self.spec, self.sample_rate, bitrate)
        self._resampler = StreamResampler(self.input_rate, self.sample_rate)
        self._writer: _Writer | None = None
        self._finished = False

    @property
    def mime_type(self) -> str:
        """The ``Content-Type`` of the produced bytes."""
        return mime_type(self.format, self.sample_rate)

    def _open(self) -> _Writer:
        if self._finished:
            raise RuntimeError("AudioEncoder is finished or closed")
        if self._writer is None:
            if self.format == "pcm":
                self._writer = _PcmWriter()
            elif self.format == "wav":
                self._writer = _WavWriter(self.sample_rate, self.streaming)
            else:
                self._writer = _PyAVWriter(self.spec, self.sample_rate, self.streaming, self.bitrate)
        return self._writer

    def encode(self, samples: np.ndarray) -> bytes:
        """Feed mono samples; return the encoded bytes that are ready now (maybe ``b""``)."""
        writer = self._open()
        x = self._resampler.process(_as_mono_float32(samples))
        return writer.write(x)

    def finish(self) -> bytes:
        """Flush the resampler, the codec and the muxer; return the last bytes. The encoder is closed after."""
        writer = self._open()
        try:
            tail = self._resampler.flush()
            out = writer.write(tail) if tail.shape[0] else b""
            return out + writer.finish()
        finally:
            self._finished = True

    def close(self) -> None:
        """Release the encoder without producing more output (e.g. the client went away). Idempotent."""
        self._finished = True
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                logger.debug("ignoring an error while closing a %s encoder", self.format, exc_info=True)

    def __enter__(self) -> AudioEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def encode_all(
    samples: np.ndarray, fmt: str, *, input_rate: int, output_rate: int | None = None, bitrate: int | None = None
) -> bytes:
    """Encode a whole signal into a complete (non-streamed) file in ``fmt``."""
    with AudioEncoder(fmt, input_rate=input_rate, output_rate=output_rate, streaming=False, bitrate=bitrate) as enc:
        return enc.encode(samples) + enc.finish()
