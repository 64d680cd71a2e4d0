"""Sample-rate conversion with soxr, for whole signals and for streams fed in chunks.

Reference audio is converted once with :func:`resample` at soxr's ``VHQ`` quality (it feeds speaker encoders,
and a few milliseconds of CPU do not matter there). Generated speech is converted on the fly by
:class:`StreamResampler` (``HQ`` by default: transparent for 16-bit output and about twice as fast).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import soxr

__all__ = ("Quality", "StreamResampler", "resample")

logger = logging.getLogger(__name__)

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]


def _check_rate(name: str, rate: int) -> int:
    if int(rate) != rate or rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
    return int(rate)


def resample(x: np.ndarray, orig_rate: int, new_rate: int, *, quality: Quality = "VHQ") -> np.ndarray:
    """``x`` (1-D, or ``(samples, channels)``) converted from ``orig_rate`` to ``new_rate`` Hz, as float32.

    When the rates are equal the input comes back as float32 without resampling (the same array if it
    already is contiguous float32). The output length is ``round(len(x) * new_rate / orig_rate)``.
    """
    orig_rate = _check_rate("orig_rate", orig_rate)
    new_rate = _check_rate("new_rate", new_rate)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if orig_rate == new_rate or x.shape[0] == 0:
        if orig_rate != new_rate:
            return np.zeros((0, *x.shape[1:]), dtype=np.float32)
        return x
    return np.asarray(soxr.resample(x, orig_rate, new_rate, quality=quality), dtype=np.float32)


class StreamResampler:
    """Chunk-by-chunk mono resampler whose concatenated output equals a one-shot conversion in length.

    ``process`` returns what is ready (soxr holds back a few milliseconds of look-ahead); ``flush`` returns
    the rest. With equal rates both are pass-throughs.
    """

    __slots__ = ("_stream", "new_rate", "orig_rate")

    def __init__(self, orig_rate: int, new_rate: int, *, quality: Quality = "HQ") -> None:
        self.orig_rate = _check_rate("orig_rate", orig_rate)
        self.new_rate = _check_rate("new_rate", new_rate)
        self._stream: soxr.ResampleStream | None = None
        if self.orig_rate != self.new_rate:
            self._stream = soxr.ResampleStream(self.orig_rate, self.new_rate, 1, dtype="float32", quality=quality)

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed mono float32 samples; return the converted samples that are ready (possibly none)."""
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        """Return the samples soxr still holds; call once, after the last :meth:`process`."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
