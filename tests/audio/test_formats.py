"""flashtts_core.audio.formats: the format table, rates, media types, extensions; import cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from flashtts_core.audio.formats import (
    FORMATS,
    RESPONSE_FORMATS,
    AudioFormat,
    format_from_extension,
    get_format,
    mime_type,
)
from flashtts_core.errors import InvalidRequestError


def test_table_matches_the_literal() -> None:
    assert RESPONSE_FORMATS == ("mp3", "opus", "aac", "flac", "wav", "pcm")
    assert set(FORMATS) == set(RESPONSE_FORMATS)
    for name, spec in FORMATS.items():
        assert spec.name == name
        assert spec.sample_rates is None or list(spec.sample_rates) == sorted(spec.sample_rates)
        assert (spec.default_bitrate is None) == spec.lossless


def test_formats_are_frozen() -> None:
    with pytest.raises(AttributeError):
        FORMATS["mp3"].mime = "x"  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(FORMATS["opus"]), type=AudioFormat) == FORMATS["opus"]


@pytest.mark.parametrize(
    ("fmt", "container", "mime"),
    [
        ("mp3", "mp3", "audio/mpeg"),
        ("opus", "ogg", "audio/ogg; codecs=opus"),
        ("aac", "adts", "audio/aac"),
        ("flac", "flac", "audio/flac"),
        ("wav", "wav", "audio/wav"),
        ("pcm", "s16le", "audio/pcm"),
    ],
)
def test_containers_and_mime_types(fmt: str, container: str, mime: str) -> None:
    assert FORMATS[fmt].container == container
    assert mime_type(fmt) == mime
    if fmt != "pcm":
        assert mime_type(fmt, 24_000) == mime


def test_pcm_mime_type_carries_rate() -> None:
    assert mime_type("pcm", 24_000) == "audio/pcm; rate=24000; channels=1"


@pytest.mark.parametrize(
    ("fmt", "requested", "used"),
    [
        ("opus", 8_000, 8_000),
        ("opus", 16_000, 16_000),
        ("opus", 22_050, 24_000),
        ("opus", 32_000, 48_000),
        ("opus", 192_000, 48_000),
        ("mp3", 24_000, 24_000),
        ("mp3", 44_100, 44_100),
        ("mp3", 96_000, 48_000),
        ("aac", 7_000, 7_350),
        ("aac", 24_000, 24_000),
        ("flac", 24_000, 24_000),
        ("flac", 1_000_000, 655_350),
        ("wav", 17_123, 17_123),
        ("pcm", 24_000, 24_000),
    ],
)
def test_supported_rate(fmt: str, requested: int, used: int) -> None:
    assert FORMATS[fmt].supported_rate(requested) == used


def test_supported_rate_rejects_nonsense() -> None:
    with pytest.raises(InvalidRequestError):
        FORMATS["wav"].supported_rate(0)


def test_get_format() -> None:
    assert get_format("flac") is FORMATS["flac"]
    with pytest.raises(InvalidRequestError, match="use one of mp3, opus") as info:
        get_format("ogg")
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        mime_type("MP3")


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("out.mp3", "mp3"),
        ("OUT.MP3", "mp3"),
        ("a/b.c/speech.opus", "opus"),
        ("x.ogg", "opus"),
        ("x.aac", "aac"),
        ("x.flac", "flac"),
        ("x.wav", "wav"),
        ("x.WAVE", "wav"),
        ("x.pcm", "pcm"),
        ("x.raw", "pcm"),
        (Path("dir") / "y.flac", "flac"),
    ],
)
def test_format_from_extension(path: str | Path, fmt: str) -> None:
    assert format_from_extension(path) == fmt


def test_format_from_extension_unknown() -> None:
    assert format_from_extension("speech", default="wav") == "wav"
    with pytest.raises(InvalidRequestError, match=r"\.mp3"):
        format_from_extension("speech.m4a")
    with pytest.raises(InvalidRequestError):
        format_from_extension("speech")


def test_importing_formats_and_package_does_not_import_av() -> None:
    code = (
        "import sys\n"
        "import flashtts_core.audio as audio\n"
        "from flashtts_core.audio.formats import FORMATS\n"
        "assert 'av' not in sys.modules and 'soxr' not in sys.modules, 'heavy import'\n"
        "audio.mime_type('mp3')\n"
        "audio.StreamResampler\n"
        "assert 'av' not in sys.modules and 'soxr' in sys.modules\n"
        "audio.AudioEncoder, audio.decode_audio\n"
        "assert 'av' in sys.modules\n"
        "assert callable(audio.resample.resample)  # the submodule, never shadowed\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
