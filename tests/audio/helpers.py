"""Test-only audio helpers: signals, PyAV-made fixture files and an independent PyAV decoder."""

from __future__ import annotations

import io

import av
import numpy as np

__all__ = ("decode_with_pyav", "make_file", "sine", "split_uneven")


def sine(rate: int, seconds: float, *, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """A mono float32 sine."""
    t = np.arange(round(rate * seconds), dtype=np.float64) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def split_uneven(x: np.ndarray, sizes: tuple[int, ...] = (1, 0, 999, 4801, 3001, 0, 7777)) -> list[np.ndarray]:
    """``x`` cut into chunks of cycling, uneven sizes (including empty ones)."""
    chunks: list[np.ndarray] = []
    i = k = 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        chunks.append(x[i : i + n])
        i += n
        k += 1
    return chunks


def make_file(
    channels: np.ndarray,
    rate: int,
    container: str,
    codec: str,
    sample_format: str,
    *,
    codec_options: dict[str, str] | None = None,
) -> bytes:
    """Encode ``channels`` (float32, shape ``(channels, samples)``, values in [-1, 1]) with PyAV into a file."""
    nch = channels.shape[0]
    layout = "mono" if nch == 1 else "stereo"
    base = sample_format.rstrip("p")
    if base == "s16":
        data = np.round(channels * 32767).astype(np.int16)
    elif base == "s32":
        data = np.round(channels.astype(np.float64) * 2147483647).astype(np.int32)
    elif base == "u8":
        data = np.round(channels * 127 + 128).astype(np.uint8)
    else:
        data = channels.astype(np.float32)
    if not sample_format.endswith("p"):
        data = data.T.reshape(1, -1)  # packed: interleave
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, options=codec_options or {})
        stream.layout = layout
        stream.format = sample_format
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=sample_format, layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def decode_with_pyav(data: bytes, *, fmt: str | None = None, rate: int | None = None) -> tuple[int, np.ndarray]:
    """(sample rate, mono float32 samples) of an encoded file, decoded with PyAV only (not our decoder).

    ``fmt``/``rate`` are for headerless input (``s16le``).
    """
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if rate else {}
    with av.open(io.BytesIO(data), format=fmt, options=options) as container:
        stream = container.streams.audio[0]
        assert stream.channels == 1
        converter = av.AudioResampler(format="flt", layout="mono")
        parts: list[np.ndarray] = []
        sample_rate = stream.rate
        for frame in container.decode(stream):
            sample_rate = frame.sample_rate
            for converted in converter.resample(frame):
                parts.append(converted.to_ndarray().reshape(-1))
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return sample_rate, samples
