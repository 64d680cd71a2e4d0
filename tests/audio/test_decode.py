"""decode_audio / decode_base64(_audio): every input format, bad inputs, limits, base64 variants."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest

from flashtts_core.audio import decode as decode_module
from flashtts_core.audio.decode import decode_audio, decode_base64, decode_base64_audio
from flashtts_core.audio.encode import encode_all
from flashtts_core.errors import AudioDecodeError, PayloadTooLargeError

from .helpers import make_file, sine

SECONDS = 1.0


def _tone(rate: int, nch: int = 1) -> np.ndarray:
    x = sine(rate, SECONDS)
    return np.repeat(x[None], nch, axis=0)


# (container, codec, sample format, rate, channels, codec options, lossless)
FIXTURES: dict[str, tuple[str, str, str, int, int, dict[str, str] | None, bool]] = {
    "wav-44k-stereo-s16": ("wav", "pcm_s16le", "s16", 44_100, 2, None, True),
    "wav-24bit": ("wav", "pcm_s24le", "s32", 48_000, 1, None, True),
    "wav-float": ("wav", "pcm_f32le", "flt", 22_050, 1, None, True),
    "wav-u8": ("wav", "pcm_u8", "u8", 8_000, 1, None, False),
    "mp3": ("mp3", "libmp3lame", "fltp", 44_100, 2, None, False),
    "flac": ("flac", "flac", "s16", 32_000, 1, None, True),
    "ogg-opus": ("ogg", "libopus", "flt", 48_000, 1, None, False),
    "ogg-vorbis": ("ogg", "vorbis", "fltp", 44_100, 2, {"strict": "experimental"}, False),
    "m4a-aac": ("ipod", "aac", "fltp", 44_100, 1, None, False),
    "webm-opus": ("webm", "libopus", "flt", 48_000, 2, None, False),
}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        name: make_file(_tone(rate, nch), rate, container, codec, fmt, codec_options=opts)
        for name, (container, codec, fmt, rate, nch, opts, _) in FIXTURES.items()
    }


@pytest.mark.parametrize("name", list(FIXTURES))
def test_decodes_every_format_to_mono_target_rate(files: dict[str, bytes], name: str) -> None:
    lossless = FIXTURES[name][-1]
    y = decode_audio(files[name], target_rate=16_000)
    assert y.dtype == np.float32 and y.ndim == 1
    if lossless:
        assert abs(len(y) - 16_000) <= 1
    else:  # codec priming/padding that some containers cannot trim
        assert 16_000 <= len(y) <= 16_000 + 0.06 * 16_000
    middle = y[4_000:12_000]
    rms = float(np.sqrt(np.mean(middle**2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    assert abs(np.argmax(spectrum) * 16_000 / len(middle) - 440) <= 4


def test_stereo_is_averaged() -> None:
    left = sine(16_000, 0.5)
    wav = make_file(np.stack([left, np.zeros_like(left)]), 16_000, "wav", "pcm_s16le", "s16")
    y = decode_audio(wav, target_rate=16_000)
    np.testing.assert_allclose(y, left / 2, atol=1 / 32768)


def test_same_rate_is_not_resampled() -> None:
    x = sine(24_000, 0.25)
    wav = make_file(x[None], 24_000, "wav", "pcm_f32le", "flt")
    np.testing.assert_array_equal(decode_audio(wav, target_rate=24_000), x)


def _png() -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (np.random.default_rng(0).bytes(20_000), "could not be read as audio"),
        (b"This is a text file, not audio.\n" * 100, "could not be read as audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00", "could not be read as audio"),
        (_png(), "no audio stream"),
    ],
    ids=["empty", "random", "text", "truncated-header", "image"],
)
def test_bad_input(data: bytes, message: str) -> None:
    with pytest.raises(AudioDecodeError, match=message) as info:
        decode_audio(data, target_rate=16_000)
    assert info.value.status_code == 400
    assert info.value.param is None
    assert info.value.code == "invalid_audio"


def test_zero_samples() -> None:
    empty_wav = encode_all(np.zeros(0, np.float32), "wav", input_rate=16_000)  # a 44-byte header, no data
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        decode_audio(empty_wav, target_rate=16_000)


def test_truncated_body_keeps_what_decoded(files: dict[str, bytes]) -> None:
    data = files["flac"]
    y = decode_audio(data[: len(data) // 2], target_rate=16_000)
    assert 0 < len(y) < 16_000


def test_param_is_reported() -> None:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(b"nope", target_rate=16_000, param="reference_audio")
    assert info.value.param == "reference_audio"
    assert "'reference_audio'" in info.value.message


def test_too_long_stops_early(files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    long_wav = make_file(sine(16_000, 30.0)[None], 16_000, "wav", "pcm_s16le", "s16")
    frames = 0
    original = decode_module._frame_to_mono

    def counting(frame: object) -> np.ndarray:
        nonlocal frames
        frames += 1
        return original(frame)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_module, "_frame_to_mono", counting)
    with pytest.raises(AudioDecodeError, match="longer than the limit of 2 s") as info:
        decode_audio(long_wav, target_rate=16_000, max_seconds=2)
    assert info.value.code == "audio_too_long"
    # 30 s of WAV is ~470 frames of 1024 samples; decoding stopped just past 2 s.
    assert frames < 60
    assert len(decode_audio(files["mp3"], target_rate=16_000, max_seconds=2)) > 0


def test_too_short(files: dict[str, bytes]) -> None:
    with pytest.raises(AudioDecodeError, match="at least 3 s") as info:
        decode_audio(files["flac"], target_rate=16_000, min_seconds=3, param="audio")
    assert info.value.code == "audio_too_short" and info.value.param == "audio"
    assert len(decode_audio(files["flac"], target_rate=16_000, min_seconds=0.5)) > 0


def test_max_bytes(files: dict[str, bytes]) -> None:
    data = files["wav-float"]
    with pytest.raises(PayloadTooLargeError) as info:
        decode_audio(data, target_rate=16_000, max_bytes=len(data) - 1)
    assert info.value.status_code == 413
    assert len(decode_audio(data, target_rate=16_000, max_bytes=len(data))) > 0


# --- base64 ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav_bytes() -> bytes:
    return make_file(sine(16_000, 0.5)[None], 16_000, "wav", "pcm_s16le", "s16")


def _variants(raw: bytes) -> dict[str, str]:
    plain = base64.b64encode(raw).decode()
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    return {
        "plain": plain,
        "data-url": "data:audio/wav;base64," + plain,
        "data-url-upper-params": "DATA:audio/x-wav;codecs=1;BASE64," + plain,
        "wrapped": wrapped + "\r\n",
        "spaces": "  " + plain[:100] + " \t " + plain[100:] + "  ",
        "no-padding": plain.rstrip("="),
        "urlsafe": base64.urlsafe_b64encode(raw).decode(),
    }


@pytest.mark.parametrize("variant", list(_variants(b"x")))
def test_base64_variants(wav_bytes: bytes, variant: str) -> None:
    text = _variants(wav_bytes)[variant]
    assert decode_base64(text) == wav_bytes
    assert decode_base64(text.encode()) == wav_bytes
    assert len(decode_base64_audio(text, target_rate=16_000)) == 8_000


@pytest.mark.parametrize("raw", [b"a", b"ab", b"abc", b"abcd"])
def test_base64_missing_padding_every_length(raw: bytes) -> None:
    assert decode_base64(base64.b64encode(raw).decode().rstrip("=")) == raw


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("UklGRi*#", "not valid base64"),
        ("UklGRiQAAABXQVZF\u00e9", "not valid base64"),
        ("UklGR", "truncated"),
        ("data:audio/wav,RIFF....", "without ';base64'"),
    ],
    ids=["bad-chars", "non-ascii", "truncated", "data-url-not-base64"],
)
def test_base64_invalid(text: str, message: str) -> None:
    with pytest.raises(AudioDecodeError, match=message) as info:
        decode_base64(text, param="audio")
    assert info.value.code == "invalid_base64" and info.value.param == "audio"


@pytest.mark.parametrize("text", ["", "   \n", "data:audio/wav;base64,", "===="])
def test_base64_empty(text: str) -> None:
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_base64(text)


def test_base64_size_cap(wav_bytes: bytes) -> None:
    text = base64.b64encode(wav_bytes).decode()
    with pytest.raises(PayloadTooLargeError):
        decode_base64(text, max_bytes=len(wav_bytes) - 10)
    with pytest.raises(PayloadTooLargeError):
        decode_base64("A" * 100_000, max_bytes=1_000)  # rejected before any cleaning or decoding
    assert decode_base64(text, max_bytes=len(wav_bytes)) == wav_bytes


def test_base64_audio_errors_are_audio_errors() -> None:
    with pytest.raises(AudioDecodeError, match="could not be read as audio"):
        decode_base64_audio(base64.b64encode(b"hello, world").decode(), target_rate=16_000)
