"""Audio I/O: PyAV encoders for every response format, reference-audio decoding, resampling.

Importing this package is cheap: :mod:`.formats` (no PyAV) is imported eagerly; the encoder, decoder and
resampler names load their modules (and PyAV / soxr) on first access.

The ``resample`` *function* is not re-exported: ``flashtts_core.audio.resample`` is its module (Python binds a
submodule to the package attribute of the same name once it is imported), so import it from there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .formats import (
    FORMATS,
    OPENAI_PCM_SAMPLE_RATE,
    RESPONSE_FORMATS,
    AudioFormat,
    ResponseFormat,
    format_from_extension,
    get_format,
    mime_type,
)

if TYPE_CHECKING:
    from .decode import decode_audio, decode_base64, decode_base64_audio
    from .encode import AudioEncoder, encode_all
    from .resample import StreamResampler

__all__ = (
    "FORMATS",
    "OPENAI_PCM_SAMPLE_RATE",
    "RESPONSE_FORMATS",
    "AudioEncoder",
    "AudioFormat",
    "ResponseFormat",
    "StreamResampler",
    "decode_audio",
    "decode_base64",
    "decode_base64_audio",
    "encode_all",
    "format_from_extension",
    "get_format",
    "mime_type",
)

_LAZY = {
    "AudioEncoder": "encode",
    "encode_all": "encode",
    "decode_audio": "decode",
    "decode_base64": "decode",
    "decode_base64_audio": "decode",
    "StreamResampler": "resample",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
