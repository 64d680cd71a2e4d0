"""AudioEncoder / encode_all: every format, streamed and not, decoded back with PyAV."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from flashtts_core.audio.encode import AudioEncoder, encode_all
from flashtts_core.audio.formats import FORMATS, RESPONSE_FORMATS
from flashtts_core.errors import InvalidRequestError

from .helpers import decode_with_pyav, sine, split_uneven

LOSSLESS = ("wav", "pcm", "flac")
SECONDS = 1.5


def _decode(data: bytes, fmt: str, rate: int) -> tuple[int, np.ndarray]:
    if fmt == "pcm":
        return decode_with_pyav(data, fmt="s16le", rate=rate)
    return decode_with_pyav(data)


def _encode_chunked(fmt: str, x: np.ndarray, **kwargs: object) -> tuple[AudioEncoder, list[bytes]]:
    enc = AudioEncoder(fmt, **kwargs)  # type: ignore[arg-type]
    outs = [enc.encode(chunk) for chunk in split_uneven(x)]
    outs.append(enc.finish())
    enc.close()
    return enc, outs


def _max_extra_seconds(fmt: str, rate: int, streaming: bool) -> float:
    """How much longer than the input a decoded file may be (codec priming/padding the container can't trim)."""
    if fmt == "aac":  # ADTS cannot signal the 1024-sample priming; plus padding to a 1024-sample frame
        return 2048 / rate + 0.002
    if fmt == "mp3" and streaming:  # no LAME gapless header: encoder delay (~1105 samples) + frame padding
        return 0.125
    return 0.002


@pytest.mark.parametrize("streaming", [False, True], ids=["file", "stream"])
@pytest.mark.parametrize("rate", [16_000, 24_000])
@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
def test_roundtrip_rate_and_duration(fmt: str, rate: int, streaming: bool) -> None:
    x = sine(rate, SECONDS)
    enc, outs = _encode_chunked(fmt, x, input_rate=rate, streaming=streaming)
    assert enc.sample_rate == rate
    data = b"".join(outs)
    got_rate, y = _decode(data, fmt, rate)
    expected_rate = 48_000 if fmt == "opus" else rate  # FFmpeg's Opus decoder always outputs 48 kHz
    assert got_rate == expected_rate
    if fmt in LOSSLESS:
        assert len(y) == len(x)
        np.testing.assert_array_equal(np.round(y * 32768), np.round(np.clip(x, -1, 1) * 32767))
    else:
        extra = len(y) / got_rate - SECONDS
        assert -0.002 <= extra <= _max_extra_seconds(fmt, rate, streaming), extra
        # Still a 0.5-amplitude sine: RMS ≈ 0.354.
        rms = float(np.sqrt(np.mean(y[len(y) // 4 : -len(y) // 4] ** 2)))
        assert 0.3 < rms < 0.4


@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
def test_output_rate_resamples(fmt: str) -> None:
    x = sine(16_000, 1.0)
    enc, outs = _encode_chunked(fmt, x, input_rate=16_000, output_rate=24_000, streaming=True)
    assert enc.sample_rate == 24_000
    got_rate, y = _decode(b"".join(outs), fmt, 24_000)
    assert got_rate == (48_000 if fmt == "opus" else 24_000)
    if fmt in LOSSLESS:
        assert abs(len(y) - 24_000) <= 1
    else:
        assert -0.002 <= len(y) / got_rate - 1.0 <= _max_extra_seconds(fmt, 24_000, True)
    # The 440 Hz tone stays at 440 Hz.
    spectrum = np.abs(np.fft.rfft(y[: got_rate // 2] * np.hanning(got_rate // 2)))
    assert abs(np.argmax(spectrum) * 2 - 440) <= 4


@pytest.mark.parametrize(
    ("fmt", "requested", "used"),
    [("opus", 22_050, 24_000), ("opus", 44_100, 48_000), ("opus", 96_000, 48_000), ("mp3", 20_000, 22_050)],
)
def test_unsupported_output_rate_moves_to_a_supported_one(fmt: str, requested: int, used: int) -> None:
    enc = AudioEncoder(fmt, input_rate=16_000, output_rate=requested, streaming=False)
    assert enc.sample_rate == used
    data = enc.encode(sine(16_000, 0.5)) + enc.finish()
    got_rate, y = decode_with_pyav(data)
    assert got_rate == (48_000 if fmt == "opus" else used)
    assert len(y) / got_rate == pytest.approx(0.5, abs=0.002)


def test_wav_file_header_has_exact_sizes() -> None:
    x = sine(24_000, 0.7)
    data = encode_all(x, "wav", input_rate=24_000)
    riff, riff_size, wave, fmt_id, fmt_size, tag, nch, rate, byte_rate, align, bits, data_id, data_size = struct.unpack(
        "<4sI4s4sIHHIIHH4sI", data[:44]
    )
    assert (riff, wave, fmt_id, data_id) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert (fmt_size, tag, nch, rate, byte_rate, align, bits) == (16, 1, 1, 24_000, 48_000, 2, 16)
    assert riff_size == len(data) - 8
    assert data_size == len(data) - 44 == 2 * len(x)


def test_wav_stream_header_is_open_ended() -> None:
    enc = AudioEncoder("wav", input_rate=16_000, streaming=True)
    first = enc.encode(sine(16_000, 0.1))
    assert first[:4] == b"RIFF" and first[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", first[4:8])[0] == 0xFFFFFFFF
    assert first[36:40] == b"data" and struct.unpack("<I", first[40:44])[0] == 0xFFFFFFFF
    assert len(first) == 44 + 2 * 1600
    assert enc.encode(sine(16_000, 0.1))[:4] != b"RIFF"  # header only once
    assert enc.finish() == b""


def test_empty_wav_and_pcm() -> None:
    wav = AudioEncoder("wav", input_rate=16_000, streaming=False).finish()
    assert len(wav) == 44 and struct.unpack("<I", wav[40:44])[0] == 0 and struct.unpack("<I", wav[4:8])[0] == 36
    assert len(AudioEncoder("wav", input_rate=16_000, streaming=True).finish()) == 44
    assert AudioEncoder("pcm", input_rate=16_000, streaming=True).finish() == b""


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_empty_input_still_finishes(fmt: str) -> None:
    enc = AudioEncoder(fmt, input_rate=24_000, streaming=False)
    assert enc.encode(np.zeros(0, np.float32)) == b""
    assert isinstance(enc.finish(), bytes)


def test_mp3_file_has_correct_xing_frame_count() -> None:
    import av

    data = encode_all(sine(24_000, 2.0), "mp3", input_rate=24_000)
    assert data[:2] == b"\xff\xf3"  # no ID3 tag; MPEG-2 Layer III frame sync
    pos = max(data.find(b"Xing", 0, 200), data.find(b"Info", 0, 200))
    assert pos > 0
    flags, frames, nbytes = struct.unpack(">III", data[pos + 4 : pos + 16])
    assert flags & 0x3 == 0x3
    with av.open(io.BytesIO(data)) as container:
        packets = [p for p in container.demux(audio=0) if p.size]
    assert frames == len(packets) > 0
    assert nbytes == len(data)
    # Gapless info (LAME tag) lets the decoder trim delay and padding exactly.
    _, y = decode_with_pyav(data)
    assert len(y) == 48_000


def test_mp3_stream_has_no_xing_placeholder() -> None:
    enc = AudioEncoder("mp3", input_rate=24_000, streaming=True)
    data = b"".join(enc.encode(c) for c in split_uneven(sine(24_000, 1.0))) + enc.finish()
    assert data[:2] == b"\xff\xf3"
    assert b"Xing" not in data[:200] and b"Info" not in data[:200]


@pytest.mark.parametrize(("streaming", "total"), [(False, 24_000), (True, 0)])
def test_flac_streaminfo_totals(streaming: bool, total: int) -> None:
    enc = AudioEncoder("flac", input_rate=24_000, streaming=streaming)
    data = b"".join(enc.encode(c) for c in split_uneven(sine(24_000, 1.0))) + enc.finish()
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first block: STREAMINFO
    packed = int.from_bytes(data[18:26], "big")
    assert packed >> 44 == 24_000
    assert packed & ((1 << 36) - 1) == total


@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
def test_stream_bytes_arrive_progressively(fmt: str) -> None:
    rate = 24_000
    x = sine(rate, 3.0)
    enc = AudioEncoder(fmt, input_rate=rate, streaming=True)
    step = rate // 4  # 250 ms chunks
    outs = [enc.encode(x[i : i + step]) for i in range(0, len(x), step)]
    tail = enc.finish()
    total = sum(map(len, outs)) + len(tail)
    # Audio (not just a header) is out after the first half second ...
    assert sum(map(len, outs[:2])) > 600
    # ... and most of the body leaves before finish().
    assert sum(map(len, outs)) > 0.6 * total
    assert sum(1 for o in outs if o) >= len(outs) - 2


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_file_mode_returns_everything_from_finish(fmt: str) -> None:
    enc = AudioEncoder(fmt, input_rate=16_000, streaming=False)
    assert enc.encode(sine(16_000, 0.5)) == b""
    assert len(enc.finish()) > 100


def test_pcm_clips_and_rounds() -> None:
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, 1e-5], dtype=np.float32)
    data = encode_all(x, "pcm", input_rate=24_000)
    assert np.frombuffer(data, "<i2").tolist() == [0, 32767, -32767, 32767, -32767, 16384, 0]


def test_int16_and_float64_input() -> None:
    ints = np.array([0, 16384, -32768], dtype=np.int16)
    assert np.frombuffer(encode_all(ints, "pcm", input_rate=8_000), "<i2").tolist() == [0, 16384, -32767]
    floats = np.array([0.25, -0.25], dtype=np.float64)
    assert np.frombuffer(encode_all(floats, "pcm", input_rate=8_000), "<i2").tolist() == [8192, -8192]
    column = np.zeros((10, 1), np.float32)
    assert len(encode_all(column, "pcm", input_rate=8_000)) == 20


def test_bitrate_is_used() -> None:
    x = sine(24_000, 2.0)
    small = encode_all(x, "mp3", input_rate=24_000, bitrate=32_000)
    large = encode_all(x, "mp3", input_rate=24_000, bitrate=128_000)
    assert len(small) < 0.4 * len(large)
    assert AudioEncoder("mp3", input_rate=8_000, streaming=False, bitrate=320_000).bitrate == 64_000
    assert AudioEncoder("aac", input_rate=8_000, streaming=False).bitrate == 48_000
    assert AudioEncoder("flac", input_rate=8_000, streaming=False, bitrate=1).bitrate is None


def test_mime_type() -> None:
    assert AudioEncoder("pcm", input_rate=24_000, streaming=True).mime_type == "audio/pcm; rate=24000; channels=1"
    assert AudioEncoder("opus", input_rate=24_000, streaming=True).mime_type == FORMATS["opus"].mime


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError) as info:
        AudioEncoder("ogg", input_rate=24_000, streaming=True)
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        AudioEncoder("wav", input_rate=0, streaming=True)
    with pytest.raises(InvalidRequestError):
        AudioEncoder("wav", input_rate=16_000, output_rate=-5, streaming=True)
    with pytest.raises(InvalidRequestError):
        AudioEncoder("mp3", input_rate=16_000, streaming=True, bitrate=0)
    enc = AudioEncoder("wav", input_rate=16_000, streaming=True)
    with pytest.raises(ValueError, match="mono"):
        enc.encode(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        enc.encode(np.zeros(10, np.int32))


def test_lifecycle() -> None:
    enc = AudioEncoder("opus", input_rate=24_000, streaming=True)
    enc.encode(sine(24_000, 0.2))
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.encode(sine(24_000, 0.1))
    enc.close()
    enc.close()
    with AudioEncoder("mp3", input_rate=24_000, streaming=True) as aborted:
        aborted.encode(sine(24_000, 0.2))  # closed without finish(): no error
