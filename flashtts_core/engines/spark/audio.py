"""Reference-audio helpers of Spark-TTS that are pure numpy: loudness normalisation and the speaker-clip rule.

They live apart from the decoding code (PyAV) and from the model code (torch) because both the engine and the voice
store need them, and because their numbers are specified exactly (models.md A.8, E.9) and tested against numpy.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ("reference_clip", "volume_normalize")

logger = logging.getLogger(__name__)


def volume_normalize(wav: np.ndarray, coeff: float = 0.2) -> np.ndarray:
    """Spark-TTS reference loudness normalisation (A.8 step 3); returns a new array of the input's dtype.

    1. ``s`` = ascending sort of ``|x|``, computed once, before any scaling;
    2. quiet input (``max|x| < 0.1``): ``x = x / max(max|x|, 1e-3) * 0.1`` (``s`` is *not* recomputed);
    3. keep the values of ``s`` above 0.01; with 10 or fewer left, stop here;
    4. ``volume`` = mean of that array between indices ``int(0.9 n)`` and ``int(0.99 n)`` (exclusive);
    5. ``x *= clip(coeff / volume, 0.1, 10)``, then divide by ``max|x|`` if it exceeds 1.
    """
    audio = np.array(wav, copy=True)
    if audio.size == 0:
        return audio
    magnitudes = np.sort(np.abs(audio))
    if magnitudes[-1] < 0.1:
        audio = audio / max(magnitudes[-1], 1e-3) * 0.1
    magnitudes = magnitudes[magnitudes > 0.01]
    count = magnitudes.shape[0]
    if count <= 10:
        return audio
    volume = np.mean(magnitudes[int(0.9 * count) : int(0.99 * count)])
    audio = audio * np.clip(coeff / volume, a_min=0.1, a_max=10)
    peak = np.max(np.abs(audio))
    if peak > 1:
        audio = audio / peak
    return audio


def reference_clip(wav: np.ndarray, length: int) -> np.ndarray:
    """The speaker clip of exactly ``length`` samples (A.8 step 4); returns a new array.

    A shorter wav is tiled (``length // len + 1`` copies) and cut; a longer one keeps its first ``length`` samples
    (no random crop at inference).
    """
    if wav.ndim != 1 or wav.shape[0] == 0:
        raise ValueError(f"reference_clip needs a non-empty 1-D waveform, got shape {wav.shape}")
    if wav.shape[0] < length:
        return np.tile(wav, length // wav.shape[0] + 1)[:length]
    return wav[:length].copy()
