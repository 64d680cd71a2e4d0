"""flashtts_core.audio.resample: one-shot (VHQ) and streamed conversion."""

from __future__ import annotations

import numpy as np
import pytest

from flashtts_core.audio.resample import StreamResampler, resample

from .helpers import sine, split_uneven


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_equal_rates_is_a_no_op() -> None:
    x = sine(16_000, 0.1)
    assert resample(x, 16_000, 16_000) is x
    y = resample(x.astype(np.float64), 16_000, 16_000)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(("orig", "new"), [(44_100, 16_000), (16_000, 24_000), (48_000, 24_000), (8_000, 22_050)])
def test_length_dtype_and_pitch(orig: int, new: int) -> None:
    x = sine(orig, 1.0)
    y = resample(x, orig, new)
    assert y.dtype == np.float32
    assert len(y) == round(len(x) * new / orig)
    assert abs(_peak_hz(y, new) - 440) <= 2
    # No level change in the pass band.
    middle = y[len(y) // 4 : -len(y) // 4]
    assert float(np.sqrt(np.mean(middle**2))) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_integer_and_empty_input() -> None:
    assert resample(np.zeros(0, np.float32), 16_000, 24_000).shape == (0,)
    y = resample(np.ones(1600, dtype=np.int16), 16_000, 8_000)
    assert y.dtype == np.float32 and len(y) == 800


@pytest.mark.parametrize("rates", [(0, 16_000), (16_000, -1), (16_000.5, 16_000)])
def test_bad_rates(rates: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        resample(np.zeros(10, np.float32), *rates)  # type: ignore[arg-type]


@pytest.mark.parametrize(("orig", "new"), [(16_000, 24_000), (24_000, 22_050), (24_000, 24_000)])
def test_stream_matches_one_shot(orig: int, new: int) -> None:
    x = sine(orig, 1.0, freq=300.0)
    stream = StreamResampler(orig, new)
    parts = [stream.process(chunk) for chunk in split_uneven(x)]
    parts.append(stream.flush())
    y = np.concatenate(parts)
    assert y.dtype == np.float32
    expected = resample(x, orig, new, quality="HQ")
    assert abs(len(y) - len(expected)) <= 1
    n = min(len(y), len(expected))
    np.testing.assert_allclose(y[:n], expected[:n], atol=1e-3)
