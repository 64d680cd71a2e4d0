"""Streamed decoding (StreamAssembler): exact length, and equal to a full decode except near the seams."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import pytest

from flashtts_core.engines.spark.streaming import (
    NON_STREAMING_SCHEDULE,
    STREAMING_SCHEDULE,
    StreamAssembler,
    StreamSchedule,
)

if TYPE_CHECKING:
    from flashtts_core.engines.spark.bicodec import BiCodec

SPT = 320
Decoder = Callable[[np.ndarray], np.ndarray]


def stream(
    tokens: np.ndarray, decode: Decoder, schedule: StreamSchedule = STREAMING_SCHEDULE, step: int = 1
) -> tuple[list[np.ndarray], list[int]]:
    """Feed ``tokens`` ``step`` at a time like an LLM would; return (chunks, ends of the non-final windows)."""
    asm = StreamAssembler(schedule)
    chunks: list[np.ndarray] = []
    ends: list[int] = []
    for n in range(step, len(tokens) + step, step):
        n = min(n, len(tokens))
        while (window := asm.next_window(n)) is not None:
            chunks.append(asm.push(window, decode(tokens[window.context_start : window.end])))
            ends.append(window.end)
    window = asm.next_window(len(tokens), final=True)
    if window is not None:
        chunks.append(asm.push(window, decode(tokens[window.context_start : window.end])))
    chunks.append(asm.flush())
    assert asm.emitted_samples == sum(c.size for c in chunks)
    return [c for c in chunks if c.size], ends


def local_decode(tokens: np.ndarray) -> np.ndarray:
    """A decoder without context: each token becomes its own 320 samples."""
    return np.repeat(np.sin(np.asarray(tokens, dtype=np.float32)), SPT)


def smoothing_decode(tokens: np.ndarray) -> np.ndarray:
    """A decoder with a ±3-token receptive field (zero padding at the window edges, like a conv stack)."""
    x = np.sin(np.asarray(tokens, dtype=np.float32))
    kernel = np.array([1, 2, 3, 4, 3, 2, 1], dtype=np.float32) / 16
    return np.repeat(np.convolve(x, kernel, mode="same"), SPT)


@pytest.mark.parametrize("n_tokens", [0, 1, 9, 10, 11, 49, 50, 51, 137, 1000])
@pytest.mark.parametrize("schedule", [STREAMING_SCHEDULE, NON_STREAMING_SCHEDULE], ids=["stream", "whole"])
def test_local_decoder_streams_exactly(n_tokens: int, schedule: StreamSchedule) -> None:
    tokens = np.arange(n_tokens)
    chunks, _ = stream(tokens, local_decode, schedule, step=3)
    out = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    assert out.size == n_tokens * SPT
    np.testing.assert_allclose(out, local_decode(tokens), atol=1e-6)


def test_cadence_matches_the_original_schedule() -> None:
    chunks, ends = stream(np.arange(2000), local_decode)
    assert ends[:5] == [50, 140, 330, 720, 1110]  # windows of 50, 100, 200, 400, 400 tokens (minus lookahead)
    assert [c.size // SPT for c in chunks[:4]] == [40, 90, 190, 390]
    assert sum(c.size for c in chunks) == 2000 * SPT


def test_context_decoder_is_exact_with_enough_lookahead() -> None:
    tokens = np.random.default_rng(1).integers(0, 8192, 777)
    full = smoothing_decode(tokens)
    chunks, _ = stream(tokens, smoothing_decode, step=7)
    np.testing.assert_allclose(np.concatenate(chunks), full, atol=1e-5)  # lookahead 10 - overlap 5 > field 3


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        StreamSchedule(first_chunk_tokens=10, lookahead_tokens=10)
    with pytest.raises(ValueError):
        StreamSchedule(overlap_tokens=6, lookahead_tokens=5)


def test_real_codec_stream_equals_full_decode_except_near_seams(spark_codec: BiCodec) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8192, 300)
    global_ids = rng.integers(0, 4096, 32)

    def decode(window: np.ndarray) -> np.ndarray:
        return spark_codec.detokenize(global_ids, window)

    full = decode(tokens)
    chunks, ends = stream(tokens, decode)
    out = np.concatenate(chunks)
    assert out.size == full.size == len(tokens) * SPT
    per_token = np.abs(out - full).reshape(-1, SPT).max(axis=1)
    near_seam = np.zeros(len(tokens), dtype=bool)
    for end in ends:
        near_seam[max(0, end - 30) : end] = True  # the tiny codec's receptive field is about 25 tokens
    assert per_token[~near_seam].max() < 1e-2
    assert near_seam.mean() < 0.25

    # At least as good as the original scheme (no left context, no lookahead beyond the cross-fade).
    original = msgspec.structs.replace(STREAMING_SCHEDULE, left_context_tokens=0, lookahead_tokens=5)
    baseline = np.concatenate(stream(tokens, decode, original)[0])
    assert baseline.size == full.size
    assert np.abs(out - full).mean() < np.abs(baseline - full).mean()
