"""Spark reference-audio helpers: loudness normalisation (A.8 step 3, exact numbers) and the speaker-clip rule."""

from __future__ import annotations

import numpy as np
import pytest

from flashtts_core.engines.spark.audio import reference_clip, volume_normalize


def test_quiet_signal_is_raised_then_scaled() -> None:
    # max 0.05 < 0.1 → x * 2 = 0.1; volume from the *original* sort = 0.05 → gain clip(0.2 / 0.05) = 4 → 0.4.
    out = volume_normalize(np.full(100, 0.05))
    np.testing.assert_array_equal(out, np.full(100, 0.05 / 0.05 * 0.1 * (0.2 / 0.05)))


def test_sorted_magnitudes_are_not_recomputed_after_the_quiet_boost() -> None:
    x = np.concatenate([np.full(50, 0.02), np.full(50, -0.05)])
    out = volume_normalize(x)
    # Boost ×2 (peak 0.05 → 0.1); the volume still comes from the unboosted values: mean(s[90:99]) = 0.05 → ×4.
    expected = x / 0.05 * 0.1 * (0.2 / 0.05)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out[:2], [0.16, 0.16])
    np.testing.assert_allclose(out[-1], -0.4)


def test_gain_is_clipped_and_peak_renormalised() -> None:
    loud = volume_normalize(np.full(20, 5.0))  # volume 5 → gain clip(0.04) = 0.1
    np.testing.assert_array_equal(loud, np.full(20, 0.5))
    x = np.concatenate([np.full(100, 0.02), [1.0]])  # volume 0.02 → gain 10 → peak 10 → divided by 10
    out = volume_normalize(x)
    np.testing.assert_allclose(out, x * 10 / 10.0)
    assert np.max(np.abs(out)) == pytest.approx(1.0)


def test_few_audible_samples_are_left_alone() -> None:
    x = np.concatenate([np.full(10, 0.5), np.full(90, 0.001)])  # only 10 values > 0.01
    out = volume_normalize(x)
    np.testing.assert_array_equal(out, x)
    assert out is not x


def test_volume_window_indices_match_the_spec() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.8, 0.8, 1000)
    s = np.sort(np.abs(x))
    s = s[s > 0.01]
    n = s.shape[0]
    volume = np.mean(s[int(0.9 * n) : int(0.99 * n)])
    expected = x * np.clip(0.2 / volume, 0.1, 10)
    np.testing.assert_array_equal(volume_normalize(x), expected)


def test_input_untouched_and_dtype_kept() -> None:
    x = np.linspace(-0.05, 0.05, 1000, dtype=np.float32)
    before = x.copy()
    out = volume_normalize(x)
    np.testing.assert_array_equal(x, before)
    assert out.dtype == np.float32
    assert volume_normalize(np.zeros(0, dtype=np.float32)).shape == (0,)


def test_reference_clip_tiles_short_and_cuts_long() -> None:
    short = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(reference_clip(short, 7), [1, 2, 3, 1, 2, 3, 1])
    long = np.arange(10, dtype=np.float32)
    clip = reference_clip(long, 4)
    np.testing.assert_array_equal(clip, [0, 1, 2, 3])
    clip[0] = 99
    assert long[0] == 0
    np.testing.assert_array_equal(reference_clip(long, 10), long)
    assert reference_clip(np.ones(96000 - 1, dtype=np.float32), 96000).shape == (96000,)


def test_reference_clip_rejects_empty_or_multichannel() -> None:
    with pytest.raises(ValueError, match="non-empty 1-D"):
        reference_clip(np.zeros(0, dtype=np.float32), 10)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        reference_clip(np.zeros((2, 5), dtype=np.float32), 10)
